"""The recipes hubmerge writes are mergekit's: `mergekit-yaml` rebuilds the same tensors.

The README promises that every output's `mergekit_config.yml` rebuilds it with mergekit too,
including module-wise NER's `linear` recipe of 0/1 weights. This runs mergekit itself (its own
command, in a subprocess) on those recipes and compares every tensor, read with the official
safetensors library, bit for bit. Skipped where mergekit is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import assert_same_tensors, run_cli, write_yaml

pytestmark = pytest.mark.skipif(
    shutil.which("mergekit-yaml") is None, reason="mergekit is not installed (extra `mergekit`)"
)


def hubmerge_merge(tmp_path: Path, config: dict, out: str) -> Path:
    result = run_cli("merge", write_yaml(tmp_path / f"{out}.yaml", config), tmp_path / out)
    assert result.exit_code == 0, result.output
    return tmp_path / out


def mergekit_rebuild(recipe: Path, out: Path) -> Path:
    done = subprocess.run(
        ["mergekit-yaml", str(recipe), str(out), "--no-lazy-unpickle", "--copy-tokenizer"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_mergekit_rebuilds_module_wise_ner(models: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "merge_method": "ner",
        "base_model": str(models["llama"]),
        "models": [str(models["llama_b"])],
        "granularity": "module",
    }
    out = hubmerge_merge(tmp_path, config, "ner")
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "linear"
    # A real module-wise mix: some tensors of the merge come from each model.
    plan = yaml.safe_load((out / "hubmerge_plan.json").read_text())
    assert any(layer.get("overrides") for layer in plan["layers"])
    assert_same_tensors(out, mergekit_rebuild(out / "mergekit_config.yml", tmp_path / "mk"))


def test_mergekit_rebuilds_scaled_passthrough(models: dict[str, Path], tmp_path: Path) -> None:
    scale = [{"filter": "o_proj", "value": 1.5}, {"filter": "down_proj", "value": 0.5}, 1.0]
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models["llama"]), "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": str(models["llama_b"]),
                        "layer_range": [1, 4],
                        "parameters": {
                            "scale": [r if isinstance(r, dict) else {"value": r} for r in scale]
                        },
                    }
                ]
            },
        ],
    }
    out = hubmerge_merge(tmp_path, config, "pt")
    assert_same_tensors(out, mergekit_rebuild(out / "mergekit_config.yml", tmp_path / "mk"))
