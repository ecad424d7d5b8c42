"""OLM's blend candidates, acceptance and module granularity, against answers known in advance.

- Blended tensors: what hubmerge writes equals an independent torch computation, `hubmerge
  merge` rebuilds the same bytes from the recipe, and so does mergekit itself.
- A planted answer: a pool where only one model's layer at one position is intact (the others'
  are random) must get that layer, also when the run is interrupted and resumed.
- A recorded score re-computed with transformers' own `generate` and forward pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hubmerge import zoo
from hubmerge.config import parse_config
from hubmerge.folder import OlmReport, yaml_text
from hubmerge.merge import merge, open_sources
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan
from hubmerge.recipe import plan_recipe
from hubmerge.writer import write_model
from tests.helpers import run_cli, tensors, write_yaml

FAMILY = [str(zoo.model_path(name)) for name in zoo.FAMILY]
BLENDS = ["layers", "mean", "task_arithmetic"]


def exact_datasets(samples: int) -> dict[str, dict[str, object]]:
    return {str(zoo.dataset_path(t, "selection")): {"mode": "exact"} for t in zoo.TASKS} | {
        "samples": samples  # type: ignore[dict-item]
    }


def olm(models: list[str], samples: int, **settings: object) -> dict[str, object]:
    return {
        "merge_method": "olm",
        "models": models,
        "dataset": {str(zoo.dataset_path(t, "selection")): {"mode": "exact"} for t in zoo.TASKS},
        "samples": samples,
        "batch_size": 64,
        "aggregate": "mean",
    } | settings


def independent_sum(terms: list[tuple[str, float]], name: str) -> torch.Tensor:
    """sum(w * t) in float32 with torch's fused multiply-add (as mergekit computes it), from
    the files as the safetensors library reads them."""
    first = load_file(Path(terms[0][0]) / "model.safetensors")[name]
    total = torch.zeros_like(first, dtype=torch.float32)
    for folder, weight in terms:
        tensor = load_file(Path(folder) / "model.safetensors")[name]
        total.addcmul_(tensor.float(), torch.tensor(weight, dtype=torch.float32))
    return total.to(first.dtype)


def bf16_copy(name: str, folder: Path) -> str:
    shutil.copytree(zoo.model_path(name), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return str(folder)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blend_plan_is_bit_identical_to_torch_its_recipe_and_mergekit(
    tmp_path: Path, dtype: str
) -> None:
    refs = FAMILY[:3]
    if dtype == "bfloat16":
        refs = [bf16_copy(Path(r).name, tmp_path / Path(r).name) for r in refs]
    sources = open_sources(refs)
    base, add, rev = refs
    suffixes = list(sources[base].layers[0])
    third = 1 / 3
    mean = tuple((r, 1, third) for r in refs)
    arithmetic = ((base, 2, 1 - 2 * 0.3), (add, 2, 0.3), (rev, 2, 0.3))
    edge = {n: tuple((r, third) for r in refs) for n in sources[base].non_layer}
    plan = MergePlan(
        "olm",
        [
            LayerPlan(add, 0),
            LayerPlan.blended(mean, suffixes),
            LayerPlan.blended(arithmetic, suffixes),
            LayerPlan(rev, 3, overrides={"mlp.down_proj.weight": (add, 3)}),
        ],
        EdgePlan(base, blends=edge),
        EdgePlan(base),
        base,
        base,
        models=refs,
    )
    ours = tmp_path / "ours"
    ours.mkdir()
    write_model(plan, sources, ours, shard_size=1 << 40)
    written = tensors(ours)

    # Independent: torch's float32 arithmetic on the tensors as the safetensors library reads them.
    key = "model.layers.1.self_attn.q_proj.weight"
    expected = independent_sum([(r, third) for r in refs], key).to(written[key].dtype)
    assert torch.equal(written[key], expected)
    key = "model.layers.2.mlp.up_proj.weight"
    expected = independent_sum([(base, 0.4), (add, 0.3), (rev, 0.3)], key).to(written[key].dtype)
    assert torch.equal(written[key], expected)
    embed = "model.embed_tokens.weight"
    assert torch.equal(
        written[embed], independent_sum([(r, third) for r in refs], embed).to(written[embed].dtype)
    )
    assert torch.equal(
        written["model.layers.3.mlp.down_proj.weight"],
        tensors(Path(add))["model.layers.3.mlp.down_proj.weight"],
    )

    recipe = plan_recipe(plan, sources)
    assert recipe["merge_method"] == "linear" and recipe["parameters"] == {"normalize": False}
    recipe_path = tmp_path / "mergekit_config.yml"
    recipe_path.write_text(yaml_text(recipe))
    assert run_cli("merge", recipe_path, tmp_path / "rebuilt").exit_code == 0
    rebuilt = tensors(tmp_path / "rebuilt")
    assert sorted(rebuilt) == sorted(written)
    assert all(torch.equal(rebuilt[k], written[k]) for k in written)

    if shutil.which("mergekit-yaml") is None:
        pytest.skip("mergekit is not installed")
    done = subprocess.run(
        ["mergekit-yaml", str(recipe_path), str(tmp_path / "mk"), "--no-lazy-unpickle"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = tensors(tmp_path / "mk")
    assert sorted(theirs) == sorted(written)
    for name, tensor in written.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


def test_plain_weighted_sum_is_planned_by_hubmerge(tmp_path: Path) -> None:
    """`linear` with `normalize: false` and constant weights is hubmerge's own plan (no mergekit
    needed to rebuild a blended recipe); it computes what torch computes."""
    config = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": r, "layer_range": [0, 4], "parameters": {"weight": 0.3}}
                         for r in FAMILY[:2]]}
        ],
        "parameters": {"normalize": False},
    }  # fmt: skip
    parsed = parse_config(config, "c")
    assert type(parsed).__name__ == "LinearConfig"
    result = run_cli("merge", write_yaml(tmp_path / "c.yaml", config), tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "hubmerge_plan.json").read_text())["method"] == "linear"
    key = "model.layers.2.mlp.gate_proj.weight"
    assert torch.equal(
        tensors(tmp_path / "out")[key], independent_sum([(r, 0.3) for r in FAMILY[:2]], key)
    )
    embed = "model.embed_tokens.weight"
    assert torch.equal(
        tensors(tmp_path / "out")[embed], independent_sum([(r, 0.3) for r in FAMILY[:2]], embed)
    )


@pytest.fixture(scope="module")
def blend_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """OLM with blend candidates on the whole zoo family (24 selection samples per task)."""
    config = olm(FAMILY, 24, candidates=BLENDS, lambdas=[0.3], direction="backward")
    out = tmp_path_factory.mktemp("blend") / "out"
    merge(parse_config(config, "test"), out)
    return config, out


def test_blend_candidates_join_every_choice_and_the_output_is_what_was_chosen(
    blend_run: tuple[dict, Path], tmp_path: Path
) -> None:
    config, out = blend_run
    report = json.loads((out / "merge_report.json").read_text())
    arithmetic = [(FAMILY[0], 1 - 3 * 0.3)] + [(r, 0.3) for r in FAMILY[1:]]
    blends = {"mean": [(r, 0.25) for r in FAMILY], "task_arithmetic(0.3)": arithmetic}
    assert list(report["base_selection"]["merit"]) == [*FAMILY, *blends]
    for record in report["layers"]:
        assert record["candidates"][0] == record["current"]
        assert set(record["candidates"]) == {*FAMILY, *blends}
        # Never worse: the winner's mean score is at most the current one's.
        assert record["merit"][record["best_model"]] <= record["merit"][record["current"]]
    # On this zoo a blend beats every fine-tune on the selection splits.
    assert report["base_model"] in blends

    written = tensors(out)
    winners = {r["layer"]: r["best_model"] for r in report["layers"]}
    for layer, winner in winners.items():
        key = f"model.layers.{layer}.self_attn.o_proj.weight"
        terms = blends.get(winner, [(winner, 1.0)])
        assert torch.equal(written[key], independent_sum(terms, key)), (layer, winner)
    embed = "model.embed_tokens.weight"
    assert torch.equal(written[embed], independent_sum(blends[report["base_model"]], embed))

    # The recipe rebuilds the same bytes.
    assert run_cli("merge", out / "mergekit_config.yml", tmp_path / "rebuilt").exit_code == 0
    rebuilt = tensors(tmp_path / "rebuilt")
    assert all(torch.equal(rebuilt[k], written[k]) for k in written)
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "linear" and recipe["parameters"]["normalize"] is False


def test_recorded_score_matches_transformers_generate_and_cross_entropy(
    blend_run: tuple[dict, Path],
) -> None:
    """The starting-model scores of the mean blend, re-computed without any hubmerge code:
    the model averaged with torch, answers from `generate` on the chat template, the
    tie-breaker as torch's cross-entropy of the reference tokens."""
    from hubmerge.methods.olm.search import select_samples

    config, out = blend_run
    report = json.loads((out / "merge_report.json").read_text())
    recorded = report["base_selection"]["scores"]["mean"]
    model = AutoModelForCausalLM.from_pretrained(FAMILY[0]).eval()
    tokenizer = AutoTokenizer.from_pretrained(FAMILY[0])
    weights = [load_file(Path(r) / "model.safetensors") for r in FAMILY]
    averaged = {k: sum(w[k] * 0.25 for w in weights) for k in weights[0]}
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings

    for name, (_, samples) in select_samples(parse_config(config, "test")).items():
        misses, nll = 0, []
        for sample in samples:
            prompt = tokenizer.apply_chat_template(
                list(sample.messages), add_generation_prompt=True, return_tensors="pt",
                return_dict=True,
            )["input_ids"]  # fmt: skip
            with torch.no_grad():
                generated = model.generate(prompt, max_new_tokens=16, do_sample=False)
            answer = tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
            misses += answer.strip() != sample.reference.strip()
            reference = tokenizer(sample.reference, add_special_tokens=False)["input_ids"]
            ids = torch.cat([prompt[0], torch.tensor(reference)])
            with torch.no_grad():
                logits = model(ids[None]).logits[0, prompt.shape[1] - 1 : -1]
            nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(reference)).item())
        assert recorded[name]["score"] == misses / len(samples), name
        assert recorded[name]["tiebreak"] == pytest.approx(sum(nll) / len(nll), rel=1e-4), name


def broken_copy(name: str, folder: Path, layer: int, seed: int) -> str:
    """Zoo model `name` with layer `layer`'s matrices replaced by random ones."""
    shutil.copytree(zoo.model_path(name), folder)
    weights = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        if key.startswith(f"model.layers.{layer}.") and value.ndim == 2:
            weights[key] = torch.randn(value.shape, generator=generator) * value.std()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_planted_layer_is_taken_and_resume_reproduces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only tiny-sort's own layer 1 is intact in the pool: OLM must take it at position 1,
    past the sign test, and an interrupted run must resume to the same model."""
    from hubmerge.methods.olm import search as search_module

    broken = [broken_copy("tiny-sort", tmp_path / f"broken{i}", 1, seed=i) for i in range(2)]
    intact = str(zoo.model_path("tiny-sort"))
    config = parse_config(
        olm([*broken, intact], 16, base_model=broken[0], direction="forward",
            acceptance={"test": "sign", "alpha": 0.01}),
        "planted",
    )  # fmt: skip
    merge(config, tmp_path / "full")
    report = json.loads((tmp_path / "full" / "merge_report.json").read_text())
    chosen = {r["layer"]: r["best_model"] for r in report["layers"]}
    assert chosen[1] == intact
    record = next(r for r in report["layers"] if r["layer"] == 1)
    assert record["acceptance"]["accepted"] and record["acceptance"]["p_value"] <= 0.01
    # Everywhere else the pool's layers are identical: ties keep the current (base) layer.
    assert all(chosen[i] == broken[0] for i in chosen if i != 1)
    full = tensors(tmp_path / "full")
    assert all(torch.equal(full[k], v) for k, v in tensors(Path(intact)).items())

    real_save = search_module.save_report
    saves = {"n": 0}

    def save_then_die(path: Path, data: OlmReport) -> None:
        real_save(path, data)
        saves["n"] += 1
        if saves["n"] == 3:  # the starting model, then positions 0 and 1
            raise KeyboardInterrupt

    monkeypatch.setattr(search_module, "save_report", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merge(config, tmp_path / "out")
    monkeypatch.undo()
    saved = json.loads((tmp_path / ".out.work" / "merge_report.json").read_text())
    assert [r["best_model"] for r in saved["layers"]] == [broken[0], intact]
    merge(config, tmp_path / "out")
    resumed = tensors(tmp_path / "out")
    assert all(torch.equal(resumed[k], full[k]) for k in full)


def test_sign_test_keeps_the_current_layer_on_a_small_gain(tmp_path: Path) -> None:
    """With min_gain above any reachable gain every swap is refused: the base comes out."""
    config = olm(FAMILY[:2], 8, base_model=FAMILY[0], acceptance={"min_gain": 1000})
    merge(parse_config(config, "strict"), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    for record in report["layers"]:
        assert record["best_model"] == FAMILY[0]
        if record["proposed"] != FAMILY[0]:
            assert record["acceptance"]["accepted"] is False
    base, out = tensors(Path(FAMILY[0])), tensors(tmp_path / "out")
    assert all(torch.equal(out[k], base[k]) for k in base)


def test_module_granularity_chooses_attention_and_mlp_separately(tmp_path: Path) -> None:
    config = olm(FAMILY[:2], 8, base_model=FAMILY[0], granularity="module",
                 candidates=["layers", "mean"], direction="forward")  # fmt: skip
    merge(parse_config(config, "module"), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [(r["layer"], r["part"]) for r in report["layers"]] == [
        (layer, part) for layer in range(4) for part in ("attention", "mlp")
    ]
    written = tensors(tmp_path / "out")
    for record in report["layers"]:
        suffix = "self_attn.k_proj.bias" if record["part"] == "attention" else "mlp.up_proj.weight"
        key = f"model.layers.{record['layer']}.{suffix}"
        winner = record["best_model"]
        terms = [(r, 0.5) for r in FAMILY[:2]] if winner == "mean" else [(winner, 1.0)]
        assert torch.equal(written[key], independent_sum(terms, key)), record
