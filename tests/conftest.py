from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from hubmerge import hub as hubmerge_hub
from tests.hubserver import TOKEN, HubServer
from tests.tinymodels import make_model

# Test models are tiny: per-op overhead dominates and a second thread only adds contention.
torch.set_num_threads(1)


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
    # Caches (NER scores) go to the test's folder, never the user's ~/.cache.
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / ".cache"))


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache of this test's own, read offline: fill it with `helpers.cache_repo`."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A Hub-compatible server on 127.0.0.1 for the real huggingface_hub client, logged in.

    `HF_ENDPOINT` is set now for hubmerge, which reads it at call time, and patched into the
    client's constants as if set at start (the client reads it at import). Xet is off, so uploads
    go through preupload and commit; retries do not wait; no stored login can leak in.
    """
    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hubmerge_hub, "RETRY", hubmerge_hub.RetryPolicy(delay=0))
        yield server
