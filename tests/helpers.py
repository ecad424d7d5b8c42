"""Small helpers the tests share: write configs, run the CLI, read tensors, compare logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hubmerge.cli import app

#: The commit a model placed in a test's Hub cache is at (any 40 hex digits will do).
CACHED_SHA = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, folder: Path, sha: str = CACHED_SHA) -> Path:
    """Lay `folder` out as huggingface_hub caches model `repo_id` at `sha`; its snapshot folder.

    With `HF_HUB_OFFLINE=1` and the client's cache pointed at `cache`, `snapshot_download` and
    `from_pretrained` resolve the id to that snapshot (reference.md, section 5).
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = Path(shutil.copytree(folder, repo / "snapshots" / sha, symlinks=False))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


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


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    """Both model folders hold the same tensors: names, dtypes and every bit of every value."""
    mine, reference = tensors(ours), tensors(theirs)
    assert sorted(mine) == sorted(reference)
    for name, tensor in mine.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name


def logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()
