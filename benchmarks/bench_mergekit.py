"""Benchmark `hubmerge merge` against `mergekit-yaml` on a method mergekit computes (slerp).

hubmerge runs mergekit's methods through mergekit's own API, then writes the recipe, sources,
card and plan; this measures what that costs on top of mergekit alone, on the same file:

* Two synthetic ~2.4 GB bf16 Llamas (``benchmarks/synth.py``, seeds 0 and 1) and a slerp of
  them with gradient ``t`` filters (mergekit's README example), written once as YAML.
* Whole processes (start-up and imports included), wall time from here and peak RSS from
  ``/usr/bin/time -v``, measured as ``bench_passthrough.py`` does: one warm-up run each, then
  rounds that alternate the two commands; medians reported. Both run on the CPU, progress bars
  off (``--quiet``), mergekit with its defaults otherwise, as hubmerge calls it.
* Afterwards every tensor of hubmerge's output is compared bitwise with mergekit's.

Target: hubmerge's wall time and peak RSS at most 1.10x mergekit's.

Run::

    python benchmarks/bench_mergekit.py [--small] [--rounds 3] [--workdir /tmp/hubmerge-bench-mk]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_passthrough import Job, compare_outputs, print_comparison, run_job  # noqa: E402
from synth import SMALL, make_synthetic_llama  # noqa: E402

#: hubmerge may cost this much more than mergekit alone, in wall time and in peak RSS.
TARGET = 1.10


def slerp_config(a: Path, b: Path, num_layers: int) -> dict[str, Any]:
    pair = [{"model": str(m), "layer_range": [0, num_layers]} for m in (a, b)]
    return {
        "merge_method": "slerp",
        "base_model": str(a),
        "slices": [{"sources": pair}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "bfloat16",
    }


def _beside_python(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hubmerge-bench-mk"))
    ap.add_argument("--small", action="store_true", help=f"tiny models for a quick check {SMALL}")
    ap.add_argument("--keep-outputs", action="store_true", help="do not delete merge outputs")
    args = ap.parse_args(argv)

    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    size = dict(SMALL) if args.small else {}
    suffix = "-small" if args.small else ""
    t0 = time.perf_counter()
    a = make_synthetic_llama(work / f"model-a{suffix}", seed=0, verbose=True, **size)
    b = make_synthetic_llama(work / f"model-b{suffix}", seed=1, verbose=True, **size)
    model_bytes = sum(p.stat().st_size for p in a.glob("*.safetensors"))
    num_layers = json.loads((a / "config.json").read_text())["num_hidden_layers"]
    print(
        f"models: 2 x {model_bytes / 1e9:.2f} GB, {num_layers} layers, "
        f"ready in {time.perf_counter() - t0:.1f} s"
    )
    config = work / "slerp.yaml"
    config.write_text(yaml.safe_dump(slerp_config(a, b, num_layers), sort_keys=False))

    outs = work / "out"
    outs.mkdir(exist_ok=True)
    hub, mk = _beside_python("hubmerge"), _beside_python("mergekit-yaml")
    jobs = [
        Job(
            "hubmerge",
            "hubmerge",
            "slerp",
            [hub, "merge", str(config), str(outs / "hubmerge")],
            outs / "hubmerge",
        ),
        Job(
            "mergekit",
            "mergekit",
            "slerp",
            [mk, str(config), str(outs / "mergekit"), "--quiet"],
            outs / "mergekit",
        ),
    ]
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    print(f"\nwarm-up (one run each), then {args.rounds} rounds; logs in {log_dir}")
    for job in jobs:
        run_job(job, log_dir, env, "warmup")
    for r in range(args.rounds):
        order = jobs if r % 2 == 0 else jobs[::-1]  # neither command always goes first
        for job in order:
            if job.failed is None:
                job.samples.append(run_job(job, log_dir, env, f"round{r + 1}"))

    ours, theirs = jobs
    figures: dict[str, Any] = {}
    print(f"\n{'command':<28} {'wall s':>8} {'peak RSS MB':>12}")
    for job in jobs:
        wall, rss = job.median_wall(), job.median_rss()
        figures[job.key] = {"median_wall_s": wall, "median_rss_mb": rss, "argv": job.argv}
        print(f"{job.key + ' slerp':<28} {wall or float('nan'):8.2f} {rss or float('nan'):12.1f}")
    ratios = {}
    if ours.failed is None and theirs.failed is None:
        for what, mine, ref in (
            ("wall", ours.median_wall(), theirs.median_wall()),
            ("peak RSS", ours.median_rss(), theirs.median_rss()),
        ):
            ratio = mine / ref if mine is not None and ref else None
            ratios[what] = ratio
            verdict = "n/a" if ratio is None else ("PASS" if ratio <= TARGET else "FAIL")
            print(
                f"hubmerge / mergekit {what:<9} {ratio or float('nan'):6.3f}"
                f"  (<= {TARGET}) {verdict}"
            )
        check = compare_outputs(ours.out, theirs.out)
        print("\ncorrectness (every tensor bitwise equal):")
        print_comparison("hubmerge vs mergekit-yaml", check)
    else:
        check = {"pass": False}
    if args.small:
        print("\n(--small: the models are tiny, so start-up dominates; the target means full size)")
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "small": args.small,
        "model_bytes": model_bytes,
        "rounds": args.rounds,
        "figures": figures,
        "ratios": ratios,
        "correct": check["pass"],
    }
    out_json = work / f"bench_mergekit{suffix.replace('-', '_')}.json"
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures written to {out_json}")
    if not args.keep_outputs:
        for job in jobs:
            shutil.rmtree(job.out, ignore_errors=True)
    return 0 if check["pass"] and all(j.failed is None for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
