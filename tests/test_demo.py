"""`hubmerge demo`: one offline command from a fresh install to a working merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hubmerge import zoo
from hubmerge.answers import exact_match_accuracy
from hubmerge.datasets import load_conversations
from tests.helpers import run_cli, tensors


def test_demo_runs_offline_and_its_model_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = run_cli("demo", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "held-out exact-match accuracy" in result.output
    out = tmp_path / "demo"
    for name in ("model.safetensors", "mergekit_config.yml", "merge_report.json", "README.md"):
        assert (out / name).is_file(), name

    # Every donor, the whole-model blends and the merge are in the table, with four task
    # scores and the composite; the margin over the best donor is the table's.
    report = json.loads((out / "merge_report.json").read_text())
    heldout = report["heldout"]
    labels = [Path(m).name for m in zoo.FAMILY]
    labels += ["mean (whole model)", "task_arithmetic(0.3) (whole model)", "merged (OLM)"]
    assert labels <= list(heldout["accuracy"])
    composite = {k: sum(v.values()) / len(v) for k, v in heldout["accuracy"].items()}
    assert heldout["best_donor"] == max(zoo.FAMILY, key=lambda m: composite[m])
    assert heldout["margin"] == pytest.approx(
        composite["merged (OLM)"] - composite[heldout["best_donor"]]
    )
    assert f"{100 * heldout['margin']:+.1f} points composite" in " ".join(result.output.split())
    card = (out / "README.md").read_text()
    assert "### Held-out comparison" in card and f"{100 * heldout['margin']:+.1f} points" in card
    assert f"| **merged (OLM)** | {heldout['accuracy']['merged (OLM)']['add']:.3f} |" in card
    # The Models table credits a donor with every layer that reads one of its tensors: a
    # blended layer counts for each model with a weight in it, counted here from the plan.
    plan = json.loads((out / "hubmerge_plan.json").read_text())
    for model in zoo.FAMILY:
        path = str(zoo.model_path(model))
        reads = sum(
            layer["model"] == path
            or any(
                t["model"] == path and t["weight"] != 0
                for b in layer.get("blends", {}).values()
                for t in b
            )
            for layer in plan["layers"]
        )
        row = next(line for line in card.splitlines() if line.startswith(f"| `{model}` "))
        assert row.split(" | ")[3] == str(reads), row

    # The output is a working chat model: it loads, and its accuracy is the table's.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    samples = load_conversations(zoo.dataset_path("add", "heldout"))
    accuracy = exact_match_accuracy(model, tokenizer, samples, max_new_tokens=16, batch_size=128)
    assert accuracy == heldout["accuracy"]["merged (OLM)"]["add"]
    assert report["complete"] and len(report["layers"]) == model.config.num_hidden_layers

    # The recipe rebuilds it byte for byte.
    assert run_cli("merge", out / "mergekit_config.yml", tmp_path / "rebuilt").exit_code == 0
    rebuilt, merged = tensors(tmp_path / "rebuilt"), tensors(out)
    assert all(torch.equal(rebuilt[k], merged[k]) for k in merged)
