"""OLM end to end on the zoo: fast path equals the slow one, determinism, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hubmerge import zoo
from hubmerge.config import parse_config
from hubmerge.merge import merge, open_sources
from tests.helpers import logits, run_cli, tensors, write_yaml

POOL = ["tiny-base", "tiny-add", "tiny-reverse"]


def olm_config(tmp_path: Path, **overrides: object) -> dict:
    """A small OLM run: three zoo models, an exact and a bigram dataset of 12 samples each."""
    config = {
        "merge_method": "olm",
        "models": [str(zoo.model_path(m)) for m in POOL],
        "dataset": {
            str(zoo.dataset_path("add", "selection")): {"mode": "exact"},
            str(zoo.dataset_path("reverse", "selection")): {"mode": "bigram"},
        },
        "samples": 12,
        "batch_size": 12,
        "direction": "backward",
    }
    return config | overrides


def report_without_timings(folder: Path) -> dict:
    report = json.loads((folder / "merge_report.json").read_text())
    for layer in report["layers"]:
        layer.pop("seconds")
    report.pop("evaluation")
    return report


def sliding_copy(name: str, folder: Path) -> str:
    """A zoo model whose layers alternate sliding-window and full attention (window 4)."""
    shutil.copytree(zoo.model_path(name), folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 0,
        "layer_types": ["full_attention", "sliding_attention"] * 2,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("attention", ["full", "alternating"])
def test_prefix_cached_scores_equal_full_evaluations(tmp_path: Path, attention: str) -> None:
    """Scoring from the cached input of layer p gives what a whole forward pass gives, also
    when each layer's attention mask depends on its index (sliding-window layers)."""
    from hubmerge.datasets import load_conversations
    from hubmerge.methods.olm.evaluate import Limits, WorkingModel

    refs = [str(zoo.model_path(m)) for m in ("tiny-base", "tiny-sort")]
    if attention == "alternating":
        refs = [sliding_copy(m, tmp_path / m) for m in ("tiny-base", "tiny-sort")]
    sources = open_sources(refs)
    base, other = sources.values()
    samples = {
        "add": ("bigram", load_conversations(zoo.dataset_path("add", "selection"))[:10]),
        "sort": ("exact", load_conversations(zoo.dataset_path("sort", "selection"))[:10]),
    }
    working = WorkingModel(
        base,
        samples,
        limits=Limits(None, 16, 1, 16),
        batch_size=4,
        device="cpu",
        dtype=torch.float32,
    )
    with pytest.raises(ValueError, match="cache_prefix"):
        working.evaluate(start=1)  # no cached prefix for position 1 yet
    for position in range(1, base.num_layers):
        working.cache_prefix(position)
        working.load_layer(position, other, position)
        fast = working.evaluate(start=position)
        slow = working.evaluate()
        for f, s in zip(fast, slow, strict=True):
            assert f.value == pytest.approx(s.value, rel=1e-5)
            assert f.tiebreak == pytest.approx(s.tiebreak, rel=1e-5)
        working.load_layer(position, base, position)
    depth = base.num_layers - 1
    assert working.counters.prefix_evaluations == depth == working.counters.full_evaluations


def test_zoo_run_end_to_end_is_deterministic_and_never_worse(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "olm.yaml", olm_config(tmp_path))
    result = run_cli("merge", config, tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert run_cli("merge", config, tmp_path / "b").exit_code == 0
    assert report_without_timings(tmp_path / "a") == report_without_timings(tmp_path / "b")

    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["complete"] and report["base_selection"] is not None
    merit = report["base_selection"]["merit"]
    assert report["base_model"] == min(merit, key=lambda m: (merit[m], list(merit).index(m)))
    positions = [layer["layer"] for layer in report["layers"]]
    assert positions == sorted(positions, reverse=True)  # backward

    # Never worse: each winner ranks at least as well as the layer it replaced.
    for layer in report["layers"]:
        assert layer["merit"][layer["best_model"]] <= layer["merit"][layer["current"]]
        assert layer["candidates"][0] == layer["current"]

    # The output is the plan: layer i equals the winner's layer i, and it loads and runs.
    out, plan = (
        tensors(tmp_path / "a"),
        json.loads((tmp_path / "a" / "hubmerge_plan.json").read_text()),
    )
    for layer in report["layers"]:
        winner = tensors(Path(layer["best_model"]))
        i = layer["layer"]
        assert plan["layers"][i]["model"] == layer["best_model"]
        key = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(out[key], winner[key])
    tokens = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    assert logits(tmp_path / "a", tokens).isfinite().all()
    assert not (tmp_path / ".a.work").exists()  # resume state removed once the output is complete


def test_single_dataset_scores_never_increase(tmp_path: Path) -> None:
    config = olm_config(
        tmp_path,
        dataset={str(zoo.dataset_path("add", "selection")): {"mode": "bigram"}},
        base_model=str(zoo.model_path("tiny-reverse")),
        direction="forward",
    )
    merge(parse_config(config, "test"), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    name = next(iter(config["dataset"]))
    previous = report["base_scores"][name]["score"]
    assert report["base_selection"] is None
    for layer in report["layers"]:
        score = layer["scores"][layer["best_model"]][name]["score"]
        assert score <= previous
        previous = score


def test_interrupted_run_resumes_without_repeating_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.methods.olm import search as search_module

    config = parse_config(olm_config(tmp_path), "test")
    merge(config, tmp_path / "full")

    saves = {"n": 0}
    real_save = search_module.save_report

    def save_then_die(path: Path, report: dict) -> None:
        real_save(path, report)
        saves["n"] += 1
        if saves["n"] == 3:  # base selection, then two positions
            raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "save_report", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merge(config, tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    saved = json.loads((tmp_path / ".out.work" / "merge_report.json").read_text())
    assert len(saved["layers"]) == 2 and not saved["complete"]

    merge(config, tmp_path / "out")
    resumed = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    # Only the positions left were evaluated: no base selection, no finished position again.
    counters = resumed["evaluation"]
    depth, rivals = len(resumed["layers"]), len(POOL) - 1
    assert counters["full_evaluations"] + counters["prefix_evaluations"] == (depth - 2) * rivals
    assert (
        report_without_timings(tmp_path / "out")["layers"]
        == (report_without_timings(tmp_path / "full")["layers"])
    )
    full, out = tensors(tmp_path / "full"), tensors(tmp_path / "out")
    assert all(torch.equal(full[k], out[k]) for k in full)


def test_changed_config_is_refused_unless_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.methods.olm import search as search_module

    real_save = search_module.save_report

    def save_then_stop(path: Path, report: dict) -> None:
        real_save(path, report)
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "save_report", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        merge(parse_config(olm_config(tmp_path), "a"), tmp_path / "out")
    monkeypatch.undo()
    changed = write_yaml(tmp_path / "b.yaml", olm_config(tmp_path, samples=10))
    result = run_cli("merge", changed, tmp_path / "out")
    assert result.exit_code == 2
    assert "different config" in result.output and "--restart" in result.output
    assert run_cli("merge", changed, tmp_path / "out", "--restart").exit_code == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["complete"]


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"conversation": [{"from": "human", "value": "hi"}]}, "record 1 has no assistant"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            None,
        ),
    ],
)
def test_dataset_errors_name_file_and_record(
    tmp_path: Path, record: dict, needle: str | None
) -> None:
    good = {"conversation": [{"from": "human", "value": "add 1+1"}, {"from": "gpt", "value": "2"}]}
    (tmp_path / "data.json").write_text(json.dumps([good, record]))
    config = olm_config(
        tmp_path,
        dataset={"data.json": {"mode": "bigram"}},
        base_model=str(zoo.model_path("tiny-base")),
    )
    result = run_cli("merge", write_yaml(tmp_path / "c.yaml", config), tmp_path / "out")
    if needle is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and "data.json" in result.output and needle in result.output
    assert not (tmp_path / "out").exists()


def test_bad_olm_configs(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("[]")
    cases = [
        (olm_config(tmp_path, dataset={"empty.json": {"mode": "bigram"}}), "empty.json"),
        (olm_config(tmp_path, dataset={"x.json": {"mode": "fuzzy"}}), "dataset['x.json'].mode"),
        (
            olm_config(
                tmp_path,
                models=[str(zoo.model_path("tiny-base")), str(zoo.model_path("tiny-incompatible"))],
            ),
            "hidden_size",
        ),
    ]
    for config, needle in cases:
        result = run_cli("merge", write_yaml(tmp_path / "c.yaml", config), tmp_path / "out")
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_device_map_auto_gives_the_same_choices(tmp_path: Path) -> None:
    """`--device auto` (accelerate's device_map) runs the same search; here all on the CPU."""
    pytest.importorskip("accelerate")
    config = olm_config(tmp_path, base_model=str(zoo.model_path("tiny-base")), direction="forward")
    merge(parse_config(config, "cpu"), tmp_path / "cpu", device="cpu")
    merge(parse_config(config, "auto"), tmp_path / "auto", device="auto")
    assert report_without_timings(tmp_path / "auto") == report_without_timings(tmp_path / "cpu")
