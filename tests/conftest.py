from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tinymodels import make_model


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shared tiny models: a bf16 Llama, a second Llama, a tied Qwen2 and misfits for errors."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_model("llama", root / "llama", dtype=torch.bfloat16),
        "llama_b": make_model("llama", root / "llama_b", seed=1, dtype=torch.bfloat16),
        "llama12": make_model("llama", root / "llama12", layers=12, seed=2),
        "qwen2": make_model("qwen2", root / "qwen2"),
        "wide": make_model("llama", root / "wide", hidden_size=48, dtype=torch.bfloat16),
    }


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in its own folder so relative model paths and outputs stay contained."""
    monkeypatch.chdir(tmp_path)
