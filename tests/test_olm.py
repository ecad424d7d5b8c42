"""OLM end to end on the zoo: fast path equals the slow one, determinism, resume, bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from hubmerge import zoo
from hubmerge.config import parse_config
from hubmerge.datasets import load_conversations
from hubmerge.folder import OlmReport
from hubmerge.merge import merge, open_sources
from hubmerge.methods.olm.evaluate import Limits, WorkingModel
from hubmerge.sources import ModelSource
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


def zoo_working(
    base: ModelSource,
    tasks: dict[str, tuple[str, int]],
    *,
    batch_size: int = 4,
    budget: int = 16,
    device: str = "cpu",
) -> WorkingModel:
    """A working model on `base` scoring, per zoo task, its first n selection samples in
    `mode` (`tasks`: task -> (mode, n)), answers up to `budget` tokens."""
    samples = {
        task: (mode, load_conversations(zoo.dataset_path(task, "selection"))[:n])
        for task, (mode, n) in tasks.items()
    }
    return WorkingModel(
        base, samples, limits=Limits(None, budget, 1, budget), batch_size=batch_size,
        device=device, dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("attention", "order", "inputs_kept"),
    [("full", "forward", "every"), ("alternating", "backward", "every"),
     ("full", "backward", "sqrt")],
)  # fmt: skip
def test_prefix_cached_scores_equal_full_evaluations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attention: str, order: str, inputs_kept: str
) -> None:
    """Scoring from the per-position caches gives bitwise what whole forward passes give, in
    every mode (teacher forcing and generation from the shared prompt prefix), in either
    order of positions, with inputs kept at every layer or (beyond the memory budget) every
    sqrt(L)-th, also when each layer's attention mask depends on its index (sliding-window
    layers); a swap below the cached position makes the cache stale."""
    from hubmerge.methods.olm import evaluate

    if inputs_kept == "sqrt":
        monkeypatch.setattr(evaluate, "KEEP_EVERY_INPUT_BYTES", 0)

    refs = [str(zoo.model_path(m)) for m in ("tiny-base", "tiny-sort")]
    if attention == "alternating":
        refs = [sliding_copy(m, tmp_path / m) for m in ("tiny-base", "tiny-sort")]
    sources = open_sources(refs)
    base, other = sources.values()
    working = zoo_working(
        base, {"add": ("bigram", 10), "sort": ("exact", 10), "reverse": ("quality", 6)}
    )
    with pytest.raises(ValueError, match="cache_prefix"):
        working.evaluate(start=1)  # no cached prefix for position 1 yet
    assert working._stride == (1 if inputs_kept == "every" else 2)
    positions = list(range(1, base.num_layers))
    if order == "backward":  # a whole-model pass keeps what the first position starts from
        working.evaluate()
        ran: list[int] = []
        layers = working.model.model.layers
        handles = [layer.register_forward_pre_hook(lambda *_: ran.append(1)) for layer in layers]
        working.cache_prefix(positions[-1])
        for handle in handles:
            handle.remove()
        assert not ran
    for position in positions if order == "forward" else positions[::-1]:
        working.cache_prefix(position)
        working.load_layer(position, other, position)
        fast = working.evaluate(start=position)
        slow = working.evaluate()
        # Score values, tie-breakers and every sample's score, bitwise
        assert [(s, s.per_sample) for s in fast] == [(s, s.per_sample) for s in slow]
        working.load_layer(position, base, position)
    counters = working.counters
    assert counters.prefix_evaluations == len(positions)
    assert counters.full_evaluations == len(positions) + (order == "backward")
    assert counters.cache_seconds > 0
    if order == "backward":  # the layers below never change: candidates follow trajectories
        assert working.counters.trajectory_steps > 0

    working.cache_prefix(2)
    working.load_layer(1, other, 1)  # below the cached position: its inputs are stale now
    with pytest.raises(ValueError, match="cache_prefix"):
        working.evaluate(start=2)
    working.cache_prefix(2)
    assert working.evaluate(start=2) == working.evaluate()


def test_whole_model_scores_are_transformers_own(tmp_path: Path) -> None:
    """A whole-model evaluation (batched, left-padded, the last layer's MLP run only where
    logits are read, misses stopped early) scores what transformers computes sample by sample:
    each exact answer is greedy `generate`'s, each token's cross-entropy (exact's tie-breaker,
    bigram) that of the model's own forward pass over prompt + answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubmerge.answers import build_prompts, eos_ids, exact_match
    from hubmerge.methods.olm.evaluate import task_max_new_tokens
    from hubmerge.methods.olm.scoring import bigram_score

    name = "tiny-add"  # right on some sort answers, wrong on others
    (source,) = open_sources([str(zoo.model_path(name))]).values()
    working = zoo_working(source, {"sort": ("exact", 10), "reverse": ("bigram", 6)})
    exact, bigram = working.evaluate()
    model = AutoModelForCausalLM.from_pretrained(zoo.model_path(name)).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.model_path(name))
    stops = eos_ids(model, tokenizer)
    budget = task_max_new_tokens(working.tasks[0], working.limits)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_ce(prompt: str, reference: str) -> torch.Tensor:
        answer = encode(reference)
        ids = torch.tensor([encode(prompt) + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, -len(answer) - 1 : -1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="none")

    sort = load_conversations(zoo.dataset_path("sort", "selection"))[:10]
    misses, nll = [], []
    for prompt, sample in zip(build_prompts(tokenizer, sort), sort, strict=True):
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=budget, do_sample=False)[0, ids.shape[1] :]
        row = new.tolist()
        row = row[: next((i for i, t in enumerate(row) if t in stops), len(row))]
        misses.append(0.0 if exact_match(tokenizer.decode(row), sample.reference) else 1.0)
        nll.append(float(token_ce(prompt, sample.reference).mean()))
    assert 0 < sum(misses) < len(misses)
    assert list(exact.per_sample) == misses
    assert exact.value == sum(misses) / len(misses)
    assert exact.tiebreak == pytest.approx(sum(nll) / len(nll), rel=1e-5)

    reverse = load_conversations(zoo.dataset_path("reverse", "selection"))[:6]
    expected = [
        bigram_score(token_ce(prompt, sample.reference).tolist())
        for prompt, sample in zip(build_prompts(tokenizer, reverse), reverse, strict=True)
    ]
    assert list(bigram.per_sample) == pytest.approx(expected, rel=1e-5)


def test_generation_from_a_position_follows_and_leaves_the_trajectory_bitwise() -> None:
    """Candidates follow the trajectory the last whole-layer generation recorded while every
    open row agrees with it, and run every layer once a row leaves it: with answers of
    different lengths (eos), rows that diverge and rows stopped early as misses, their scores
    are bitwise those of whole-model evaluations."""

    refs = [str(zoo.model_path(m)) for m in ("tiny-base", "tiny-sort")]
    base, other = open_sources(refs).values()
    working = zoo_working(
        base, {"sort": ("exact", 12), "reverse": ("quality", 6)}, batch_size=6, budget=12
    )
    recorded = working.evaluate()
    diverged = False
    for position in (3, 2, 1):
        working.cache_prefix(position)
        working.load_layer(position, other, position)
        before = working.counters.trajectory_steps
        fast = working.evaluate(start=position)
        followed = working.counters.trajectory_steps - before
        slow = working.evaluate()  # records the trajectory the next position follows
        assert [(s, s.per_sample) for s in fast] == [(s, s.per_sample) for s in slow]
        assert followed > 0
        diverged |= slow[0].per_sample != recorded[0].per_sample
        recorded = slow
        working.load_layer(position, base, position)
    assert diverged


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

    def save_then_die(path: Path, report: OlmReport) -> None:
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

    def save_then_stop(path: Path, report: OlmReport) -> None:
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


def test_swaps_reach_layers_accelerate_offloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`device: auto` for a model larger than its devices: accelerate keeps some layers'
    weights off the device (here layers 1 and 3 on disk, their parameters placeholders on
    `meta`); a swap there must reach the weights those layers run with."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    offloaded = {"model.layers.1": "disk", "model.layers.3": "disk"}

    def offloading(path: object, **kwargs: object) -> object:
        assert kwargs.pop("device_map") == "auto"
        others = ["model.embed_tokens", "model.layers.0", "model.layers.2", "model.norm"]
        device_map = {name: "cpu" for name in [*others, "model.rotary_emb", "lm_head"]}
        return real(path, device_map=device_map | offloaded, offload_folder=str(tmp_path), **kwargs)

    sources = open_sources([str(zoo.model_path(m)) for m in ("tiny-base", "tiny-sort")])
    base, other = sources.values()
    tasks = {"sort": ("exact", 8), "add": ("bigram", 8)}
    plain = zoo_working(base, tasks)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offloading)
    spread = zoo_working(base, tasks, device="auto")
    assert spread.model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    assert spread.evaluate() == plain.evaluate()
    for layer in (3, 2):  # offloaded, then resident
        before = spread.evaluate()
        for model in (plain, spread):
            model.load_layer(layer, other, layer)
        assert spread.evaluate() == plain.evaluate() != before


def test_generation_uses_transformers_current_cache_api() -> None:
    """Greedy decoding and OLM's generation (whole and from a position's cache) pass the KV
    cache as `cache`: no FutureWarning about `past_key_values`, which transformers 5.40
    removes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubmerge.answers import build_prompts, greedy_generate

    path = zoo.model_path("tiny-base")
    items = load_conversations(zoo.dataset_path("sort", "selection"))[:4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        answers = greedy_generate(model, tokenizer, build_prompts(tokenizer, items), 8)
        (base,) = open_sources([str(path)]).values()
        working = WorkingModel(
            base, {"sort": ("exact", items)}, limits=Limits(None, 8, 1, 8), batch_size=4,
            device="cpu", dtype=torch.float32,
        )  # fmt: skip
        working.cache_prefix(2)
        assert working.evaluate(start=2) == working.evaluate()
    assert len(answers) == 4 and working.counters.generated_tokens > 0
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
