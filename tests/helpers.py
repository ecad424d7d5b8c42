"""Small helpers the tests share: write configs, run the CLI, read tensors, compare logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hubmerge.cli import app


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str | Path) -> Any:
    """Invoke the `hubmerge` CLI in-process; returns typer's result (exit_code, output)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, single-file or sharded."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else [folder / "model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    return out


def logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()
