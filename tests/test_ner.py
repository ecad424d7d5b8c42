"""NER selection: the score against a float64 SVD, choices recomputed independently from the
source tensors, outputs that load and equal their sources, recipes that rebuild every byte,
the score cache, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hubmerge import zoo
from hubmerge.config import parse_config
from hubmerge.merge import merge, open_sources
from hubmerge.methods.ner import scores as ner
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan
from hubmerge.recipe import plan_recipe
from hubmerge.tensorfile import TensorInfo
from hubmerge.writer import write_model
from tests.helpers import logits, run_cli, tensors, write_yaml
from tests.test_bad_input import assert_refused
from tests.tinymodels import make_model

TOKENS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))


def reference_ner(matrix: np.ndarray | torch.Tensor, *, minmax: bool = False) -> float:
    """Seed 002's definition, straight from a float64 numpy SVD."""
    a = np.asarray(matrix, dtype=np.float64)
    if minmax:
        a = (a - a.min()) / (a.max() - a.min())
    s = np.linalg.svd(a, compute_uv=False)
    s = s[s > 1e-12]
    if len(s) < 2:
        return 0.0
    p = s / s.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(len(s)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Score the matrices tested directly on one thread, as merges do on the CPU: LAPACK on
    two threads stalls for seconds on tiny matrices while the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh score cache per test, so no test sees another's scores (or the user's)."""
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama candidates (bf16), a byte copy of the base (every score ties), and tied Qwen2s."""
    root = tmp_path_factory.mktemp("ner")
    paths = {
        name: make_model("llama", root / name, seed=seed, dtype=torch.bfloat16)
        for name, seed in (("base", 10), ("c1", 11), ("c2", 12))
    }
    paths["twin"] = Path(shutil.copytree(paths["base"], root / "twin"))
    for name, seed in (("qbase", 20), ("q1", 21), ("q2", 22)):
        paths[name] = make_model("qwen2", root / name, seed=seed)
    return paths


def ner_config(pool: dict[str, Path], base: str, *candidates: str, **extra: object) -> dict:
    return {
        "merge_method": "ner",
        "base_model": str(pool[base]),
        "models": [str(pool[c]) for c in candidates],
        **extra,
    }


def run_merge(tmp_path: Path, config: dict, out: str = "out") -> Path:
    result = run_cli("merge", write_yaml(tmp_path / f"{out}.yaml", config), tmp_path / out)
    assert result.exit_code == 0, result.output
    return tmp_path / out


def first_best(scores: dict[str, float]) -> str:
    """The highest score; of equal ones (within 1e-10) the first in pool order (base first)."""
    top = max(scores.values())
    return next(model for model, score in scores.items() if score >= top - 1e-10)


def assert_rebuilds(tmp_path: Path, out: Path) -> None:
    """`hubmerge merge` of the written recipe gives the same files, byte for byte."""
    recipe = out / "mergekit_config.yml"
    result = run_cli("merge", recipe, tmp_path / "rebuilt", "--no-card")
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "rebuilt" / name).read_bytes() == (out / name).read_bytes(), name


def test_known_spectra() -> None:
    assert ner.matrix_ner(np.eye(6, dtype=np.float32)) == pytest.approx(1.0, abs=1e-12)
    rank_one = np.outer(np.arange(1, 9), np.arange(1, 6)).astype(np.float32)
    assert ner.matrix_ner(rank_one) == 0.0
    assert ner.matrix_ner(np.diag([3.0, 1.0])) == pytest.approx(0.811278, abs=1e-6)
    assert ner.matrix_ner(np.zeros((5, 3), dtype=np.float32)) == 0.0
    assert ner.ner_of(np.array([2.0, 1e-13])) == 0.0  # one value above the threshold


@pytest.mark.parametrize("shape", [(16, 16), (64, 24), (24, 64), (300, 40), (40, 300), (96, 96)])
def test_agrees_with_a_float64_svd(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    dense = rng.standard_normal(shape).astype(np.float32)
    # A wide spread of singular values (1 .. 1e-5) and an exactly rank-deficient integer
    # matrix, which the Gram route must hand to the SVD.
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], min(shape))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], min(shape))))
    spread = ((u * np.logspace(0, -5, min(shape))) @ v.T).astype(np.float32)
    low_rank = (rng.integers(-3, 4, (shape[0], 3)) @ rng.integers(-3, 4, (3, shape[1]))).astype(
        np.float32
    )
    for matrix in (dense, spread, low_rank):
        assert abs(ner.matrix_ner(matrix) - reference_ner(matrix)) < 1e-6
        assert (
            abs(ner.matrix_ner(matrix, normalize="minmax") - reference_ner(matrix, minmax=True))
            < 1e-6
        )


def test_only_rank_deficient_matrices_take_the_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    svdvals = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a: calls.append(a.shape) or svdvals(a))
    rng = np.random.default_rng(0)
    ner.matrix_ner(rng.standard_normal((80, 30)).astype(np.float32))
    assert calls == []
    ner.matrix_ner((rng.integers(-3, 4, (80, 2)) @ rng.integers(-3, 4, (2, 30))).astype(np.float32))
    assert calls == [(80, 30)]


def test_gram_in_blocks_and_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gram matrix summed over many slices, in row blocks, as for a big matrix."""
    monkeypatch.setattr(ner, "_SLICE", 1 << 14)  # slices of 31 columns
    wide = torch.randn(520, 800, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    exact = wide.double() @ wide.double().T
    assert torch.allclose(ner.gram(wide).triu(), exact.triu(), rtol=1e-12, atol=1e-9)
    assert torch.allclose(ner.gram(wide.T).triu(), exact.triu(), rtol=1e-12, atol=1e-9)
    assert abs(ner.matrix_ner(wide) - reference_ner(wide.float())) < 1e-6


def test_layer_selection(pool: dict[str, Path], tmp_path: Path) -> None:
    config = ner_config(pool, "base", "twin", "c1", "c2")
    out = run_merge(tmp_path, config)
    report = json.loads((out / "ner_report.json").read_text())
    refs = [config["base_model"], *config["models"]]
    assert report["models"] == refs
    sources = {ref: tensors(Path(ref)) for ref in refs}
    merged = tensors(out)
    chosen = []
    for record in report["layers"]:
        i = record["layer"]
        means = {}
        for ref in refs:
            matrices = {
                name.removeprefix(f"model.layers.{i}."): t
                for name, t in sources[ref].items()
                if name.startswith(f"model.layers.{i}.") and t.ndim == 2
            }
            reported = record["scores"][ref]["matrices"]
            assert reported.keys() == matrices.keys()
            for suffix, t in matrices.items():
                assert abs(reported[suffix] - reference_ner(t.float())) < 1e-6
            means[ref] = float(np.mean([reported[s] for s in matrices]))
            assert record["scores"][ref]["mean"] == pytest.approx(means[ref], abs=1e-12)
        winner = first_best({ref: record["scores"][ref]["mean"] for ref in refs})
        assert record["chosen"] == winner != config["models"][0]  # the twin only ever ties
        chosen.append(winner)
        for name, t in sources[winner].items():
            if name.startswith(f"model.layers.{i}."):
                assert torch.equal(merged[name], t), name
    assert len(set(chosen)) > 1, "the pool should mix models for this test to mean anything"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], sources[refs[0]][name])
    assert merged.keys() == sources[refs[0]].keys()
    assert report["recipe"]["merge_method"] == "passthrough"
    assert logits(out, TOKENS).isfinite().all()
    assert (out / "ner_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_rebuilds(tmp_path, out)


def test_module_selection_with_tied_embeddings(pool: dict[str, Path], tmp_path: Path) -> None:
    config = ner_config(pool, "qbase", "q1", "q2", granularity="module", embeddings="ner")
    out = run_merge(tmp_path, config)
    report = json.loads((out / "ner_report.json").read_text())
    refs = [config["base_model"], *config["models"]]
    sources = {ref: tensors(Path(ref)) for ref in refs}
    merged = tensors(out)
    assert "lm_head.weight" not in merged
    for record in report["layers"]:
        i = record["layer"]
        prefix = f"model.layers.{i}."
        scores = {ref: record["scores"][ref]["matrices"] for ref in refs}
        layer_best = first_best({ref: float(np.mean(list(scores[ref].values()))) for ref in refs})
        assert record["chosen"] == layer_best
        for name in (n for n in merged if n.startswith(prefix)):
            suffix = name.removeprefix(prefix)
            weight = suffix.removesuffix("bias") + "weight" if suffix.endswith(".bias") else suffix
            if weight in scores[refs[0]]:  # a matrix, or the bias of one: its own best model
                for ref in refs:
                    t = sources[ref][prefix + weight]
                    assert abs(scores[ref][weight] - reference_ner(t)) < 1e-6
                expected = first_best({ref: scores[ref][weight] for ref in refs})
            else:  # norms: the layer's best model
                expected = layer_best
            assert record["modules"][suffix] == expected
            assert torch.equal(merged[name], sources[expected][name]), name
    taken = {m for r in report["layers"] for m in r["modules"].values()}
    assert taken == set(refs), "the pool should mix all models for this test to mean anything"

    # Tied embeddings: chosen once, by the embedding matrix, and the final norm goes along.
    embed = "model.embed_tokens.weight"
    edge_scores = report["embed"]["scores"]
    for ref in refs:
        assert abs(edge_scores[ref] - reference_ner(sources[ref][embed])) < 1e-6
    best = first_best(edge_scores)
    assert report["head"] == {"chosen": best, "tied": True}
    for name in (embed, "model.norm.weight"):
        assert torch.equal(merged[name], sources[best][name])

    assert report["recipe"]["merge_method"] == "linear"
    plan = json.loads((out / "hubmerge_plan.json").read_text())
    assert any("overrides" in layer for layer in plan["layers"])
    assert MergePlan.from_dict(plan).to_dict() == plan
    assert logits(out, TOKENS).isfinite().all()
    assert_rebuilds(tmp_path, out)


def test_selection_recipe_names_edge_donors(pool: dict[str, Path], tmp_path: Path) -> None:
    """Embeddings and head from a model no layer uses: the linear recipe still rebuilds it."""
    refs = {name: str(pool[name]) for name in ("base", "c1", "c2")}
    sources = open_sources(list(refs.values()))
    suffixes = list(sources[refs["base"]].layers[0])
    layers = [
        LayerPlan.from_choices(
            {
                s: (refs["c1"] if (i + k) % 3 == 0 else refs["base"], i)
                for k, s in enumerate(suffixes)
            }
        )
        for i in range(4)
    ]
    plan = MergePlan(
        method="ner",
        layers=layers,
        embed=EdgePlan(refs["c2"]),
        head=EdgePlan(refs["c2"]),
        donor=refs["base"],
        tokenizer=refs["base"],
        models=list(refs.values()),
    )
    (tmp_path / "planned").mkdir()
    write_model(plan, sources, tmp_path / "planned", shard_size=10**9)
    recipe = plan_recipe(plan, sources)
    assert recipe["merge_method"] == "linear"
    assert recipe["slices"][-1]["sources"][0]["model"] == refs["c2"]  # mergekit's head pairing
    result = run_cli("merge", write_yaml(tmp_path / "r.yaml", recipe), tmp_path / "rebuilt")
    assert result.exit_code == 0, result.output
    planned = (tmp_path / "planned" / "model.safetensors").read_bytes()
    assert (tmp_path / "rebuilt" / "model.safetensors").read_bytes() == planned


def test_zoo_family(tmp_path: Path) -> None:
    """The shipped trained models: choices match NER recomputed from their weights, and the
    merged model loads, generates and is rebuilt byte for byte by its recipe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refs = [str(zoo.model_path(name)) for name in zoo.FAMILY]
    out = run_merge(tmp_path, {"merge_method": "ner", "base_model": refs[0], "models": refs[1:]})
    report = json.loads((out / "ner_report.json").read_text())
    sources = {ref: tensors(Path(ref)) for ref in refs}
    merged = tensors(out)
    for record in report["layers"]:
        prefix = f"model.layers.{record['layer']}."
        means = {
            ref: float(
                np.mean(
                    [
                        reference_ner(t)
                        for n, t in sources[ref].items()
                        if n.startswith(prefix) and t.ndim == 2
                    ]
                )
            )
            for ref in refs
        }
        assert all(abs(record["scores"][r]["mean"] - means[r]) < 1e-6 for r in refs)
        assert record["chosen"] == first_best(means)
        assert all(
            torch.equal(t, sources[record["chosen"]][n])
            for n, t in merged.items()
            if n.startswith(prefix)
        )
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("add 12+30", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert_rebuilds(tmp_path, out)


def test_minmax_reproduces_the_public_values(pool: dict[str, Path], tmp_path: Path) -> None:
    config = ner_config(pool, "base", "c1", normalize="minmax")
    out = run_merge(tmp_path, config)
    report = json.loads((out / "ner_report.json").read_text())
    source = tensors(pool["c1"])
    plain = ner.matrix_ner(source["model.layers.0.mlp.up_proj.weight"].float())
    for record in report["layers"]:
        for suffix, value in record["scores"][str(pool["c1"])]["matrices"].items():
            t = source[f"model.layers.{record['layer']}.{suffix}"].float()
            assert abs(value - reference_ner(t, minmax=True)) < 1e-6
    # The [0, 1] shift adds a dominant rank-one component: far from the plain score.
    minmaxed = report["layers"][0]["scores"][str(pool["c1"])]["matrices"]["mlp.up_proj.weight"]
    assert plain - minmaxed > 0.01


def test_cache_scores_only_the_new_candidate(
    pool: dict[str, Path], tmp_path: Path, _cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored: list[Path] = []
    original = ner.score_tensor

    def counting(info: TensorInfo, **kwargs: object) -> float:
        scored.append(info.file.parent)
        return original(info, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ner, "score_tensor", counting)
    matrices_per_model = 4 * 7  # 4 layers of q, k, v, o, gate, up, down

    def run(*candidates: str) -> None:
        config = parse_config(ner_config(pool, "base", *candidates), "ner.yaml")
        merge(config, tmp_path / "dry", dry_run=True)

    run("c1")
    assert len(scored) == 2 * matrices_per_model and any((_cache / "ner").glob("*.json"))
    scored.clear()
    run("c1", "c2")
    assert scored == [pool["c2"]] * matrices_per_model
    scored.clear()
    weights = pool["c1"] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    run("c1", "c2")  # a rewritten file (new mtime) is scored again
    assert scored == [pool["c1"]] * matrices_per_model
    scored.clear()
    for entry in (_cache / "ner").glob("*.json"):
        entry.write_text("{not json")
    run("c1")  # an unreadable cache only costs the time to score again
    assert len(scored) == 2 * matrices_per_model


def _rewrite(src: Path, dst: Path, change: dict[str, torch.Tensor | None]) -> Path:
    """A copy of model `src` whose tensors named in `change` are replaced (or, None, dropped)."""
    shutil.copytree(src, dst)
    state = tensors(src)
    for name, value in change.items():
        if value is None:
            del state[name]
        else:
            state[name] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("granularity", ["granularity: Input should be 'layer' or 'module'"]),
        ("wide", ["hidden_size 48 differs"]),
        ("short", ["3 layers, the base model"]),
        ("no_layer", ["layer 2 has no tensors"]),
        ("no_tensor", ["layer 1: tensor self_attn.q_proj.weight is missing"]),
        ("shape", ["layer 1: tensor mlp.up_proj.weight has shape [60, 32]", "[64, 32]"]),
        ("cuda", ["--device cuda: CUDA is not available"]),
    ],
)
def test_bad_input(pool: dict[str, Path], tmp_path: Path, case: str, needles: list[str]) -> None:
    base = pool["c1"]
    layer2 = [n for n in tensors(base) if n.startswith("model.layers.2.")]
    candidate = {
        "granularity": lambda: pool["c2"],
        "wide": lambda: make_model("llama", tmp_path / "m", hidden_size=48),
        "short": lambda: make_model("llama", tmp_path / "m", layers=3),
        "no_layer": lambda: _rewrite(base, tmp_path / "m", dict.fromkeys(layer2)),
        "no_tensor": lambda: _rewrite(
            base, tmp_path / "m", {"model.layers.1.self_attn.q_proj.weight": None}
        ),
        "shape": lambda: _rewrite(
            base, tmp_path / "m", {"model.layers.1.mlp.up_proj.weight": torch.zeros(60, 32)}
        ),
        "cuda": lambda: pool["c2"],
    }[case]()
    config = {"merge_method": "ner", "base_model": str(base), "models": [str(candidate)]}
    if case == "granularity":
        config["granularity"] = "block"
    args = ("--device", "cuda") if case == "cuda" else ()
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_refused(tmp_path, write_yaml(tmp_path / "c.yaml", config), *needles, args=args)


def test_zoo_model_of_another_size(tmp_path: Path) -> None:
    config = {
        "merge_method": "ner",
        "base_model": str(zoo.model_path(zoo.BASE)),
        "models": [str(zoo.model_path(zoo.INCOMPATIBLE))],
    }
    assert_refused(tmp_path, write_yaml(tmp_path / "c.yaml", config), "hidden_size", "differs")
