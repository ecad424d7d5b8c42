"""Benchmark OLM's evaluation loop: prefix-cached candidate scoring, layer swaps, generation.

OLM scores every pool layer at every position, so its cost is (positions x candidates) model
evaluations. `WorkingModel` keeps that cheap three ways, and this benchmark measures each one
against what it replaces, in the same process and run so the machine's load hits both alike:

* Teacher-forced scoring (`bigram` mode, and `exact`'s tie-breaker) at position p runs only
  layers p..L-1 (`evaluate(start=p)`) on hidden states cached once per position
  (`cache_prefix(p)`). Compared with one full-model `evaluate()` on the same data, averaged
  over p = 1..L-1, with and without the cache cost amortised over the position's candidates
  (pool size - 1). Target: a candidate evaluation <= 0.6x a full one.
* A layer swap (`load_layer`) copies one layer's tensors from safetensors into the loaded
  model. Target: <= 5% of a full evaluation (also shown against a candidate evaluation).
* Generation (`exact` mode: greedy, batched, KV cache): tokens per second from
  `WorkingModel.counters` (tokens up to each row's end of sequence, or up to where its answer
  has certainly missed the reference, i.e. useful tokens).
* Few-shot prompts, as OLM's real datasets have: every sample gets solved samples of its own
  split as earlier turns until its prompt is `--prompt-ratio` (default 10) times its answer
  budget (exact's max_new_tokens: longest reference + 4). The same sweep as above in `exact`,
  `bigram` and `quality` mode (quality generates that same budget): a candidate starts its
  generation from the per-position prompt cache (hidden states entering layer p, KV cache of
  layers < p) and its decoding steps follow the trajectory the last whole-layer generation
  recorded (layers p..L-1 only) while its open rows agree with it. Target (exact): candidate /
  full <= 0.5 with the caching amortised over the position's candidates. Scores must be
  bitwise equal to the full path's. Note that 0.5 is the mean of (L - p) / L over
  p = 1..L-1, the share of layers a candidate runs; it gets below that only because every pass
  over prompts skips most of the last layer (its MLP runs only where logits are read), which
  is a larger share of a candidate's layers than of the whole model's. The synthetic pool's
  random models answer nothing alike, so no candidate follows a trajectory there (most of
  their answers miss at the first token): the zoo's few-shot sweep (trained models) shows the
  trajectories at work (`trajectory_steps` in the counters).
* The whole `hubmerge demo` as a user runs it: a subprocess, wall and CPU time.

Fast and full evaluations must agree: at each position the candidate's prefix-cached scores
are compared with a full evaluation of the same weights (max relative difference; exit code 1
beyond `AGREEMENT_TOLERANCE`, or for the few-shot sweeps when not bitwise equal).

`--device cuda` (with `--dtype bfloat16`) runs every working model there, synchronising before
each clock reading; the CPU figures are the default.

Two setups: the zoo (tiny trained Qwen2 models, 4 layers, hidden 64; pool = `zoo.FAMILY`) and a
synthetic Llama pool (`synth.py`, default 12 layers, hidden 512, bf16 on disk, one seed per
pool member) with the zoo's byte-level tokenizer copied in, so the zoo's chat prompts work. Both
score the zoo's four selection splits. Models are cached under `--workdir`.

Timings: wall (`perf_counter`) and process CPU time (`process_time`) per call; medians over
`--repeats` sweeps. On a shared machine wall time is noisy and CPU time is the steadier figure;
both are printed, with the load average. torch runs `--threads` threads (default 1: on a busy
2-core machine more threads mostly wait for each other); the demo subprocess picks its own.

Run::

    /work/venv/bin/python benchmarks/bench_olm.py [--quick] [--repeats 3] [--demo-runs 1]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--prompt-ratio 10] [--workers 2]
        [--workdir /tmp/hubmerge-bench/olm] [--json /tmp/hubmerge-bench/bench_olm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import make_synthetic_llama  # noqa: E402

#: A teacher-forced candidate evaluation may cost at most this share of a full evaluation.
TARGET_CANDIDATE_RATIO = 0.6
#: With few-shot prompts, an exact-mode candidate (per-position caching included) at most this.
TARGET_FEW_SHOT_EXACT_RATIO = 0.5
#: A layer swap may cost at most this share of a (full) evaluation.
TARGET_SWAP_RATIO = 0.05
#: Largest relative difference allowed between prefix-cached and full scores.
AGREEMENT_TOLERANCE = 1e-4
#: Zoo tokenizer files copied next to each synthetic model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

T = TypeVar("T")

#: Where working models run, and what waits for the device before a clock is read.
DEVICE = {"device": "cpu", "dtype": "float32"}
#: The order positions are swept in (OLM's `direction`; the per-position caches depend on it).
ORDER = {"order": "backward"}


def sync() -> None:
    if DEVICE["device"].startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Timing:
    """Wall and process-CPU seconds of one call."""

    wall: float
    cpu: float


def timed(fn: Callable[[], T]) -> tuple[T, Timing]:
    """Call `fn` and return its result with its wall and CPU time."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, Timing(time.perf_counter() - w, time.process_time() - c)


def med(ts: Sequence[Timing]) -> Timing:
    """Median wall and median CPU time (each taken separately)."""
    return Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))


def mean(ts: Sequence[Timing]) -> Timing:
    return Timing(statistics.fmean(t.wall for t in ts), statistics.fmean(t.cpu for t in ts))


def ratio(a: Timing, b: Timing) -> Timing:
    return Timing(a.wall / b.wall if b.wall else float("nan"), a.cpu / b.cpu if b.cpu else 0.0)


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "FAIL"


# --------------------------------------------------------------------------- models and data


def zoo_vocab_size() -> int:
    """Vocabulary size of the zoo tokenizer (added tokens included): the synthetic vocab."""
    from tokenizers import Tokenizer

    from hubmerge import zoo

    path = zoo.model_path(zoo.BASE) / "tokenizer.json"
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def synthetic_pool(
    root: Path, size: int, *, layers: int, hidden: int, intermediate: int, heads: int, kv: int
) -> list[Path]:
    """Write (or reuse) `size` synthetic Llamas, seeds 0..size-1, speaking the zoo tokenizer.

    `synth.py` caches each folder by its parameters; the zoo tokenizer is copied in and the
    special token ids in `config.json` are pointed at it (idempotent), so generation stops at
    the zoo's `<|im_end|>` and padding uses its pad token.
    """
    from transformers import AutoTokenizer

    from hubmerge import zoo

    base = zoo.model_path(zoo.BASE)
    tok = AutoTokenizer.from_pretrained(base)
    vocab = zoo_vocab_size()
    paths = []
    for seed in range(size):
        out = root / f"synth-l{layers}-h{hidden}-i{intermediate}-v{vocab}-seed{seed}"
        make_synthetic_llama(
            out,
            num_layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            vocab=vocab,
            num_heads=heads,
            num_kv_heads=kv,
            shards=1,
            seed=seed,
            tokenizer=False,
        )
        for name in TOKENIZER_FILES:
            if (
                not (out / name).is_file()
                or (out / name).read_bytes() != (base / name).read_bytes()
            ):
                shutil.copyfile(base / name, out / name)
        cfg = json.loads((out / "config.json").read_text())
        ids = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        if any(cfg.get(k) != v for k, v in ids.items()):
            cfg.update(ids)
            (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        paths.append(out)
    return paths


def task_samples(pool: Sequence[Path], n: int, mode: str) -> dict[str, tuple[str, list[Any]]]:
    """Each zoo task's selection split in `mode`, `n` samples chosen as OLM chooses them."""
    from hubmerge import zoo
    from hubmerge.config import OlmConfig, parse_config
    from hubmerge.methods.olm.search import select_samples

    config = parse_config(
        {
            "merge_method": "olm",
            "models": [str(p) for p in pool],
            "dataset": {str(zoo.dataset_path(t, "selection")): {"mode": mode} for t in zoo.TASKS},
            "samples": n,
        },
        "bench_olm",
    )
    assert isinstance(config, OlmConfig)
    return select_samples(config)


def working_model(base: Any, samples: dict[str, Any], batch_size: int, limits: Any = None) -> Any:
    """A `WorkingModel` on `DEVICE` with OLM's default limits unless given (as `search`
    builds it)."""
    import torch

    from hubmerge.config import OlmLimits
    from hubmerge.methods.olm.evaluate import Limits, WorkingModel

    if limits is None:
        lim = OlmLimits()
        limits = Limits(
            lim.exact.max_new_tokens,
            lim.quality.max_new_tokens,
            lim.quality.min_words,
            lim.quality.target_words,
        )
    return WorkingModel(
        base,
        samples,
        limits=limits,
        batch_size=batch_size,
        device=DEVICE["device"],
        dtype=getattr(torch, DEVICE["dtype"]),
    )


def few_shot(
    pool: Sequence[Path], samples: int, mode: str, ratio: float
) -> tuple[dict[str, tuple[str, list[Any]]], int, float]:
    """Each zoo task's selection samples with solved samples of the same split prepended as
    earlier turns, until each prompt has `ratio` x its task's answer budget in tokens.

    The budget is exact mode's default max_new_tokens (longest reference + 4), which the
    benchmark's quality mode generates too. Returns the tasks, the largest budget and the
    measured mean prompt / budget ratio.
    """
    from transformers import AutoTokenizer

    from hubmerge import zoo
    from hubmerge.answers import build_prompts
    from hubmerge.datasets import Sample, load_conversations

    tokenizer = AutoTokenizer.from_pretrained(pool[0])

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chosen = task_samples(pool, samples, mode)
    out: dict[str, tuple[str, list[Any]]] = {}
    budgets, ratios = [], []
    for (name, (_, items)), task in zip(chosen.items(), zoo.TASKS, strict=True):
        shots = [
            s for s in load_conversations(zoo.dataset_path(task, "selection")) if s not in items
        ]
        budget = max(count(s.reference) for s in items) + 4
        budgets.append(budget)
        long = []
        for i, sample in enumerate(items):
            turns: list[dict[str, str]] = []
            for j in range(len(shots)):
                prompt = build_prompts(tokenizer, [Sample((*turns, *sample.messages), "")])[0]
                if count(prompt) >= ratio * budget:
                    break
                shot = shots[(i * 7 + j) % len(shots)]
                turns += [*shot.messages, {"role": "assistant", "content": shot.reference}]
            long.append(Sample((*turns, *sample.messages), sample.reference))
            ratios.append(count(prompt) / budget)
        out[name] = (mode, long)
    return out, max(budgets), statistics.fmean(ratios)


def max_rel_diff(fast: Sequence[Any], full: Sequence[Any]) -> float:
    """Largest relative difference between two score lists (value and tie-breaker)."""
    worst = 0.0
    for a, b in zip(fast, full, strict=True):
        for x, y in ((a.value, b.value), (a.tiebreak, b.tiebreak)):
            if x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


# --------------------------------------------------------------------------- measurements


def measure_setup(
    name: str,
    pool: Sequence[Path],
    *,
    samples: int,
    batch_size: int,
    repeats: int,
    prompt_ratio: float,
) -> dict[str, Any]:
    """Teacher-forced sweeps, swaps and agreement, exact-mode generation, then the few-shot
    sweeps in every mode, for one pool.

    Each part builds its own working model, one at a time.
    """
    from hubmerge.sources import ModelSource

    sources = [ModelSource.open(str(p)) for p in pool]
    result = measure_teacher_forced(name, pool, sources, samples, batch_size, repeats)
    result["generation"] = measure_generation(sources[0], pool, samples, batch_size, repeats)
    result["few_shot"] = measure_few_shot(pool, sources, samples, batch_size, repeats, prompt_ratio)
    return result


def measure_teacher_forced(
    name: str,
    pool: Sequence[Path],
    sources: Sequence[Any],
    samples: int,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    """`sweep` in bigram mode on the zoo's own (short) prompts, with the model's figures."""
    base, rivals = sources[0], sources[1:]
    depth = base.num_layers
    cfg = base.config
    data = task_samples(pool, samples, "bigram")
    wm, load_t = timed(lambda: working_model(base, data, batch_size))
    forced = [b for task in wm.tasks for b in task.forced_batches]
    info = {
        "pool": [str(p) for p in pool],
        "architecture": cfg["architectures"][0],
        "layers": depth,
        "hidden": cfg["hidden_size"],
        "intermediate": cfg["intermediate_size"],
        "vocab": cfg["vocab_size"],
        "parameters": sum(p.numel() for p in wm.model.parameters()),
        "layer_parameters": sum(p.numel() for p in wm.model.model.layers[0].parameters()),
        "disk_dtype": sorted({t.dtype for t in base.tensors.values()}),
        "samples_per_task": samples,
        "tasks": len(wm.tasks),
        "batch_size": batch_size,
        "batches": len(forced),
        "tokens_per_evaluation": int(sum(int(b.attention_mask.sum()) for b in forced)),
        "padded_tokens_per_evaluation": int(sum(b.input_ids.numel() for b in forced)),
        "model_load_s": load_t.wall,
    }
    print(
        f"\n[{name}] {info['architecture']} {depth} layers, hidden {info['hidden']}, "
        f"{info['parameters'] / 1e6:.2f} M params; pool {len(pool)}; "
        f"{info['tasks']} tasks x {samples} samples = {info['tokens_per_evaluation']} tokens "
        f"per evaluation",
        flush=True,
    )

    result: dict[str, Any] = {"model": info, **sweep(wm, base, rivals, repeats)}
    cand_ratio = Timing(**result["ratio_candidate_vs_full"])
    swap_ratio = Timing(**result["ratio_swap_vs_full"])
    result["targets"] = {
        "candidate_vs_full": {
            "target": TARGET_CANDIDATE_RATIO,
            "value": cand_ratio.wall,
            "value_cpu": cand_ratio.cpu,
            "verdict": verdict(cand_ratio.wall, TARGET_CANDIDATE_RATIO),
        },
        "swap_vs_full": {
            "target": TARGET_SWAP_RATIO,
            "value": swap_ratio.wall,
            "value_cpu": swap_ratio.cpu,
            "verdict": verdict(swap_ratio.wall, TARGET_SWAP_RATIO),
        },
    }
    return result


def sweep(wm: Any, base: Any, rivals: Sequence[Any], repeats: int) -> dict[str, Any]:
    """`repeats` sweeps over positions p in `ORDER` (1..L-1): cache, swaps, candidate and full
    scoring, summarised.

    A sweep times one full `evaluate()`, then for every position p: `cache_prefix(p)`, and for
    each rival (pool member other than the base) a swap of its layer p in and a prefix-cached
    `evaluate(start=p)`, then a swap restoring the base's layer. In the first sweep the first
    rival's prefix scores are also checked against a full `evaluate()` of the same weights
    (those full evaluations are timed samples too).
    """
    depth = base.num_layers
    positions = list(range(1, depth))
    if ORDER["order"] == "backward":
        positions.reverse()
    # warm-up: first calls pay lazy initialisation
    wm.evaluate()
    wm.cache_prefix(positions[0])
    wm.evaluate(start=positions[0])

    full: list[Timing] = []
    cache: dict[int, list[Timing]] = {p: [] for p in positions}
    prefix: dict[int, list[Timing]] = {p: [] for p in positions}
    swaps: list[Timing] = []
    agreement: dict[int, float] = {}
    bitwise = True
    for round_ in range(repeats):
        began = time.perf_counter()
        _, t = timed(wm.evaluate)
        full.append(t)
        for p in positions:
            cache[p].append(timed(lambda p=p: wm.cache_prefix(p))[1])
            for k, rival in enumerate(rivals):
                swaps.append(timed(lambda p=p, r=rival: wm.load_layer(p, r, p))[1])
                fast, t = timed(lambda p=p: wm.evaluate(start=p))
                prefix[p].append(t)
                if round_ == 0 and k == 0:
                    slow, t = timed(wm.evaluate)
                    full.append(t)
                    agreement[p] = max_rel_diff(fast, slow)
                    bitwise = bitwise and fast == slow
            swaps.append(timed(lambda p=p: wm.load_layer(p, base, p))[1])
        print(f"  sweep {round_ + 1}/{repeats}: {time.perf_counter() - began:.1f} s", flush=True)

    full_m = med(full)
    per_position = []
    for p in sorted(positions):
        c, f = med(cache[p]), med(prefix[p])
        per_position.append(
            {
                "position": p,
                "cache_prefix": vars(c),
                "candidate": vars(f),
                "candidate_vs_full": vars(ratio(f, full_m)),
                "max_rel_diff": agreement.get(p),
            }
        )
    candidate = mean([med(prefix[p]) for p in prefix])
    cache_mean = mean([med(cache[p]) for p in cache])
    per_cand = len(rivals)
    amortised = mean(
        [
            Timing(
                med(prefix[p]).wall + med(cache[p]).wall / per_cand,
                med(prefix[p]).cpu + med(cache[p]).cpu / per_cand,
            )
            for p in prefix
        ]
    )
    swap_m = med(swaps)
    return {
        "order": ORDER["order"],
        "full_evaluation": {"median": vars(full_m), "samples": [vars(t) for t in full]},
        "candidate_evaluation_mean": vars(candidate),
        "cache_prefix_mean": vars(cache_mean),
        "candidates_per_position": per_cand,
        "candidate_with_amortised_cache_mean": vars(amortised),
        "ratio_candidate_vs_full": vars(ratio(candidate, full_m)),
        "ratio_candidate_with_cache_vs_full": vars(ratio(amortised, full_m)),
        "swap": {"median": vars(swap_m), "count": len(swaps)},
        "ratio_swap_vs_full": vars(ratio(swap_m, full_m)),
        "ratio_swap_vs_candidate": vars(ratio(swap_m, candidate)),
        "per_position": per_position,
        "agreement_max_rel_diff": max(agreement.values()) if agreement else None,
        "bitwise_equal": bitwise,
        "counters": dict(vars(wm.counters)),
    }


def measure_few_shot(
    pool: Sequence[Path],
    sources: Sequence[Any],
    samples: int,
    batch_size: int,
    repeats: int,
    prompt_ratio: float,
) -> dict[str, Any]:
    """The sweep with few-shot prompts in each mode; exact carries the target."""
    from hubmerge.methods.olm.evaluate import Limits

    out: dict[str, Any] = {}
    for mode in ("exact", "bigram", "quality"):
        data, budget, measured = few_shot(pool, samples, mode, prompt_ratio)
        wm = working_model(
            sources[0], data, batch_size, Limits(None, budget, min_words=1, target_words=16)
        )
        forced = [b for task in wm.tasks for b in task.forced_batches + task.prompt_batches]
        print(
            f"  few-shot {mode}: prompt / answer budget {measured:.1f}x, "
            f"{sum(int(b.attention_mask.sum()) for b in forced)} prompt(+answer) tokens",
            flush=True,
        )
        out[mode] = {"prompt_ratio": measured, "answer_budget": budget}
        out[mode] |= sweep(wm, sources[0], sources[1:], repeats)
        del wm
    value = Timing(**out["exact"]["ratio_candidate_with_cache_vs_full"])
    out["target"] = {
        "target": TARGET_FEW_SHOT_EXACT_RATIO,
        "value": value.wall,
        "value_cpu": value.cpu,
        "verdict": verdict(value.wall, TARGET_FEW_SHOT_EXACT_RATIO),
    }
    return out


def measure_generation(
    base: Any, pool: Sequence[Path], samples: int, batch_size: int, repeats: int
) -> dict[str, Any]:
    """Exact-mode evaluations of the base: generation tokens/s from the counters, per repeat."""
    wm = working_model(base, task_samples(pool, samples, "exact"), batch_size)
    wm.evaluate()  # warm-up
    rates, tokens, seconds, whole = [], [], [], []
    for _ in range(repeats):
        before = (wm.counters.generated_tokens, wm.counters.generation_seconds)
        _, t = timed(wm.evaluate)
        n = wm.counters.generated_tokens - before[0]
        s = wm.counters.generation_seconds - before[1]
        rates.append(n / s if s else float("nan"))
        tokens.append(n)
        seconds.append(s)
        whole.append(t)
    whole_m = med(whole)
    gen_s = statistics.median(seconds)
    return {
        "tokens_per_second": statistics.median(rates),
        "tokens_per_evaluation": statistics.median(tokens),
        "generation_seconds_per_evaluation": gen_s,
        "exact_evaluation": vars(whole_m),
        "generation_share_of_exact_evaluation": gen_s / whole_m.wall if whole_m.wall else None,
        "samples": [
            {"tokens": n, "seconds": s, "rate": r}
            for n, s, r in zip(tokens, seconds, rates, strict=True)
        ],
    }


def measure_workers(pool: Sequence[Path], samples: int, workers: int) -> dict[str, Any]:
    """One OLM search (exact and bigram data, starting model given) in this process, then with
    `workers` CPU worker processes: wall time of the positions (from the report) and of the
    whole search (worker start-up included), and whether the reports agree."""
    from hubmerge import zoo
    from hubmerge.config import OlmConfig, parse_config
    from hubmerge.methods.olm.search import search
    from hubmerge.sources import ModelSource

    sources = {str(p): ModelSource.open(str(p)) for p in pool}
    runs: dict[int, Any] = {}
    for n in (1, workers):
        config = parse_config(
            {
                "merge_method": "olm",
                "models": [str(p) for p in pool],
                "base_model": str(pool[0]),
                "dataset": {
                    str(zoo.dataset_path("add", "selection")): {"mode": "exact"},
                    str(zoo.dataset_path("reverse", "selection")): {"mode": "bigram"},
                },
                "samples": samples,
                "batch_size": samples,
                "workers": n,
            },
            "bench_olm",
        )
        assert isinstance(config, OlmConfig)
        result, t = timed(lambda c=config: search(c, sources, device=DEVICE["device"], state=None))
        report = result.report
        runs[n] = {
            "search": vars(t),
            "positions_wall_s": sum(layer.seconds for layer in report.layers),
            "decisions": [layer.best_model for layer in report.layers],
            "scores": [layer.scores for layer in report.layers],
        }
        print(
            f"  {n} worker(s): search {t.wall:.1f} s wall, positions "
            f"{runs[n]['positions_wall_s']:.1f} s",
            flush=True,
        )
    one, many = runs[1], runs[workers]
    return {
        "workers": workers,
        "runs": {str(n): {k: v for k, v in r.items() if k != "scores"} for n, r in runs.items()},
        "speedup_positions": one["positions_wall_s"] / many["positions_wall_s"],
        "speedup_search": one["search"]["wall"] / many["search"]["wall"],
        "same_report": one["decisions"] == many["decisions"] and one["scores"] == many["scores"],
    }


def measure_demo(
    hubmerge: str, runs: int, log_dir: Path, omp_threads: int | None
) -> dict[str, Any]:
    """Run `hubmerge demo OUT --force` in a temp dir `runs` times; wall and children's CPU.

    With `omp_threads`, the subprocess gets `OMP_NUM_THREADS` (the demo caps torch's threads
    at what torch reports, which follows that variable); otherwise the environment is as is.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    out: dict[str, Any] = {
        "argv": [hubmerge, "demo", "OUT", "--force"],
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "runs": [],
    }
    for i in range(runs):
        log = log_dir / f"demo.{i + 1}.log"
        with tempfile.TemporaryDirectory(prefix="bench-olm-demo-") as tmp:
            target = Path(tmp) / "out"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            load_before = os.getloadavg()[0]
            with log.open("w") as lf:
                t0 = time.perf_counter()
                rc = subprocess.call(
                    [hubmerge, "demo", str(target), "--force"],
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=tmp,
                )
                wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            report = target / "merge_report.json"
            evaluation = (
                json.loads(report.read_text()).get("evaluation") if report.is_file() else None
            )
        run = {
            "wall_s": wall,
            "cpu_s": cpu,
            "rc": rc,
            "log": str(log),
            "load1_before": load_before,
            "olm_counters": evaluation,
        }
        out["runs"].append(run)
        status = "ok" if rc == 0 else f"FAILED rc={rc} (log {log})"
        print(
            f"  demo run {i + 1}/{runs}: {wall:.1f} s wall, {cpu:.1f} s CPU, {status}", flush=True
        )
    ok = [r for r in out["runs"] if r["rc"] == 0]
    if ok:
        out["median_wall_s"] = statistics.median(r["wall_s"] for r in ok)
        out["median_cpu_s"] = statistics.median(r["cpu_s"] for r in ok)
    return out


# --------------------------------------------------------------------------- report


def print_tables(setups: dict[str, dict[str, Any]], demo: dict[str, Any] | None) -> None:
    """Print the side-by-side summary, the targets, and per-position figures."""
    names = list(setups)
    width = 26

    def row(label: str, cells: Sequence[str]) -> None:
        print(f"{label:<46}" + "".join(f"{c:>{width}}" for c in cells))

    def wc(t: dict[str, float], spec: str = ".4f") -> str:
        return f"{format(t['wall'], spec)} / {format(t['cpu'], spec)}"

    print("\nwall / CPU (process time), medians; seconds unless noted")
    row("", names)
    row(
        "model",
        [
            f"{s['model']['layers']}L h{s['model']['hidden']} {s['model']['parameters'] / 1e6:.1f}M"
            for s in setups.values()
        ],
    )
    row(
        "tokens per evaluation", [str(s["model"]["tokens_per_evaluation"]) for s in setups.values()]
    )
    row("full evaluate()", [wc(s["full_evaluation"]["median"]) for s in setups.values()])
    row(
        "candidate evaluate(start=p), mean p",
        [wc(s["candidate_evaluation_mean"]) for s in setups.values()],
    )
    row(
        "  ratio candidate / full",
        [wc(s["ratio_candidate_vs_full"], ".3f") for s in setups.values()],
    )
    row(
        "cache_prefix(p), mean p (once per position)",
        [wc(s["cache_prefix_mean"]) for s in setups.values()],
    )
    row(
        "candidates per position (pool - 1)",
        [str(s["candidates_per_position"]) for s in setups.values()],
    )
    row(
        "  ratio (candidate + cache/cands) / full",
        [wc(s["ratio_candidate_with_cache_vs_full"], ".3f") for s in setups.values()],
    )
    row("load_layer (swap)", [wc(s["swap"]["median"], ".5f") for s in setups.values()])
    row("  ratio swap / full", [wc(s["ratio_swap_vs_full"], ".4f") for s in setups.values()])
    row(
        "  ratio swap / candidate",
        [wc(s["ratio_swap_vs_candidate"], ".4f") for s in setups.values()],
    )
    row(
        "generation tok/s (exact mode, counters)",
        [f"{s['generation']['tokens_per_second']:.1f}" for s in setups.values()],
    )
    gens = [s["generation"] for s in setups.values()]
    row(
        "  exact evaluate() (generation share)",
        [
            f"{g['exact_evaluation']['wall']:.3f} ({g['generation_share_of_exact_evaluation']:.0%})"
            for g in gens
        ],
    )
    row(
        "fast vs full: max relative difference",
        [f"{s['agreement_max_rel_diff']:.2e}" for s in setups.values()],
    )

    print("\ntargets (wall-time ratios; CPU-time ratio in brackets)")
    for name, s in setups.items():
        for key, label in (
            ("candidate_vs_full", f"candidate / full <= {TARGET_CANDIDATE_RATIO}"),
            ("swap_vs_full", f"swap / full <= {TARGET_SWAP_RATIO}"),
        ):
            t = s["targets"][key]
            print(
                f"  {name:<12} {label:<28} {t['value']:8.4f} ({t['value_cpu']:.4f})  {t['verdict']}"
            )

    print(
        "\nfew-shot prompts (prompt tokens / answer budget shown); candidates start from the "
        "per-position caches; wall / CPU"
    )
    for name, s in setups.items():
        fs = s["few_shot"]
        for mode in ("exact", "bigram", "quality"):
            m = fs[mode]
            print(
                f"  {name:<10} {mode:<8} prompt {m['prompt_ratio']:4.1f}x  full "
                f"{wc(m['full_evaluation']['median'])}  candidate/full "
                f"{wc(m['ratio_candidate_vs_full'], '.3f')}  with cache "
                f"{wc(m['ratio_candidate_with_cache_vs_full'], '.3f')}  cache/position "
                f"{wc(m['cache_prefix_mean'])}  bitwise equal {m['bitwise_equal']}"
            )
        t = fs["target"]
        print(
            f"  {name:<10} exact: (candidate + cache/cands) / full <= "
            f"{TARGET_FEW_SHOT_EXACT_RATIO}: {t['value']:.4f} ({t['value_cpu']:.4f})  "
            f"{t['verdict']}"
        )

    for name, s in setups.items():
        print(f"\n[{name}] per position: cache_prefix, candidate evaluation, candidate/full (wall)")
        for r in s["per_position"]:
            diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
            print(
                f"  p={r['position']:<3} cache {r['cache_prefix']['wall']:8.4f}  candidate "
                f"{r['candidate']['wall']:8.4f}  ratio {r['candidate_vs_full']['wall']:6.3f}  "
                f"(cpu {r['candidate_vs_full']['cpu']:.3f})  fast-vs-full {diff}"
            )

    if demo is not None:
        threads = demo["omp_num_threads"] or "unset"
        print(f"\nhubmerge demo (subprocess, OMP_NUM_THREADS {threads})")
        if "median_wall_s" in demo:
            print(f"  median wall {demo['median_wall_s']:.1f} s, CPU {demo['median_cpu_s']:.1f} s")
        for r in demo["runs"]:
            c = r.get("olm_counters")
            if c:
                print(
                    f"  OLM counters (exact mode): {c['full_evaluations']} full "
                    f"{c['full_seconds']:.1f} s, {c['prefix_evaluations']} prefix "
                    f"{c['prefix_seconds']:.1f} s, generation {c['generation_seconds']:.1f} s for "
                    f"{c['generated_tokens']} tokens, {c['swaps']} swaps {c['swap_seconds']:.3f} s"
                )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, prepare the pools, measure, print, write JSON; 1 if scores disagree."""
    here = Path(sys.executable).parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, few samples, no demo"
    )
    ap.add_argument("--repeats", type=int, default=None, help="sweeps per setup (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    ap.add_argument("--zoo-samples", type=int, default=None, help="per task (default 48)")
    ap.add_argument("--synth-samples", type=int, default=None, help="per task (default 4)")
    ap.add_argument("--synth-layers", type=int, default=12)
    ap.add_argument("--synth-hidden", type=int, default=512)
    ap.add_argument("--synth-intermediate", type=int, default=1408)
    ap.add_argument("--synth-heads", type=int, default=8)
    ap.add_argument("--synth-kv-heads", type=int, default=4)
    ap.add_argument("--synth-pool", type=int, default=3, help="synthetic pool size (seeds)")
    ap.add_argument("--setups", default="zoo,synthetic", help="comma list of zoo, synthetic")
    ap.add_argument(
        "--prompt-ratio", type=float, default=10.0, help="few-shot prompt / answer budget"
    )
    ap.add_argument(
        "--order", choices=["forward", "backward"], default="backward", help="sweep order"
    )
    ap.add_argument("--device", default="cpu", help="where working models run (cpu, cuda)")
    ap.add_argument(
        "--workers", type=int, default=2, help="CPU workers to compare with one process (0: skip)"
    )
    ap.add_argument("--dtype", default="float32", help="working model dtype (float32, bfloat16)")
    ap.add_argument("--demo-runs", type=int, default=None, help="default 1 (0 with --quick)")
    ap.add_argument(
        "--demo-omp-threads",
        type=int,
        default=None,
        help="set OMP_NUM_THREADS for the demo subprocess (default: environment unchanged)",
    )
    ap.add_argument(
        "--hubmerge",
        default=str(here / "hubmerge") if (here / "hubmerge").exists() else "hubmerge",
        help="hubmerge console script for the demo (default: beside this Python, else PATH)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hubmerge-bench/olm"))
    ap.add_argument("--json", type=Path, default=None, help="default /tmp/hubmerge-bench/...")
    args = ap.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    zoo_n = args.zoo_samples or (8 if quick else 48)
    synth_n = args.synth_samples or (2 if quick else 4)
    demo_runs = args.demo_runs if args.demo_runs is not None else (0 if quick else 1)
    json_path = args.json or Path(
        "/tmp/hubmerge-bench/bench_olm_quick.json"
        if quick
        else "/tmp/hubmerge-bench/bench_olm.json"
    )
    wanted = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(wanted) - {"zoo", "synthetic"}
    if unknown:
        ap.error(f"unknown setups {sorted(unknown)}")

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from hubmerge import zoo

    torch.set_num_threads(args.threads)
    DEVICE.update(device=args.device, dtype=args.dtype)
    ORDER["order"] = args.order
    transformers.logging.set_verbosity_error()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    print(
        f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} on "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"{repeats} repeat(s)"
    )

    setups: dict[str, dict[str, Any]] = {}
    if "zoo" in wanted:
        pool = [zoo.model_path(m) for m in zoo.FAMILY]
        setups["zoo"] = measure_setup(
            "zoo",
            pool,
            samples=zoo_n,
            batch_size=zoo_n,
            repeats=repeats,
            prompt_ratio=args.prompt_ratio,
        )

    def synthetic_from_args() -> list[Path]:
        return synthetic_pool(
            work,
            args.synth_pool,
            layers=args.synth_layers,
            hidden=args.synth_hidden,
            intermediate=args.synth_intermediate,
            heads=args.synth_heads,
            kv=args.synth_kv_heads,
        )

    if "synthetic" in wanted:
        t0 = time.perf_counter()
        pool = synthetic_from_args()
        print(f"\nsynthetic pool ready in {time.perf_counter() - t0:.1f} s: {work}")
        setups["synthetic"] = measure_setup(
            "synthetic",
            pool,
            samples=synth_n,
            batch_size=synth_n,
            repeats=repeats,
            prompt_ratio=args.prompt_ratio,
        )

    parallel = None
    if args.workers > 1:
        print(f"\nworkers: one process vs {args.workers} CPU workers (synthetic pool)", flush=True)
        pool = synthetic_from_args()
        parallel = measure_workers(pool, synth_n, args.workers)
        print(
            f"  speed-up with {args.workers} workers: positions "
            f"{parallel['speedup_positions']:.2f}x, whole search (start-up included) "
            f"{parallel['speedup_search']:.2f}x; same decisions and scores: "
            f"{parallel['same_report']} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})"
        )

    demo = None
    if demo_runs:
        print(f"\nhubmerge demo: {demo_runs} run(s)", flush=True)
        log_dir = work / "logs"
        log_dir.mkdir(exist_ok=True)
        demo = measure_demo(args.hubmerge, demo_runs, log_dir, args.demo_omp_threads)

    load_end = os.getloadavg()
    print_tables(setups, demo)
    total = time.perf_counter() - started
    print(
        f"\nload average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} "
        f"({os.cpu_count()} CPUs): wall times are noisy on a shared machine; CPU times steadier."
    )
    print(f"benchmark wall time {total:.1f} s")

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "repeats": repeats,
        "setups": setups,
        "workers": parallel,
        "demo": demo,
        "benchmark_wall_s": total,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {json_path}")

    bad = [
        name
        for name, s in setups.items()
        if s["agreement_max_rel_diff"] is None
        or s["agreement_max_rel_diff"] > AGREEMENT_TOLERANCE
        or not all(s["few_shot"][m]["bitwise_equal"] for m in ("exact", "bigram", "quality"))
    ]
    failed_demo = demo is not None and any(r["rc"] != 0 for r in demo["runs"])
    if parallel is not None and not parallel["same_report"]:
        bad.append("workers")
    if bad or failed_demo:
        print(f"PROBLEMS: fast/full scores disagree in {bad}; demo failed: {failed_demo}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
