"""Benchmark hubmerge's passthrough / block-expansion merges against mergekit and ``cp -r``.

What it measures, and why this way:

* Whole processes (start-up and imports included), because that is what a user waits for;
  wall time from this process, peak RSS from ``/usr/bin/time -v`` (or, if absent, a small
  Python wrapper reporting ``getrusage(RUSAGE_CHILDREN).ru_maxrss``), a fresh one per run.
* The same synthetic ~2.4 GB bf16 Llama (``benchmarks/synth.py``) for every tool. The page
  cache cannot be dropped here, so each command runs once as a warm-up and then in several
  rounds, commands alternating within a round; medians are reported. ``sync`` runs (untimed)
  before each measurement so one run's dirty pages are not flushed during the next.
* ``cp -r MODEL OUT`` is the floor: reading and writing the same bytes without any parsing.

Configs: (a) a seed-004 style scaled passthrough (six slices, o_proj/down_proj scaled),
(b) a seed-003 style LLaMA-Pro expansion written as mergekit slices (8 copies of the last
layer with o_proj/down_proj scaled to 0), and (c) hubmerge's native ``block_expansion`` form
of (b). After timing, hubmerge's outputs are compared tensor by tensor (bitwise) with
mergekit's: (a) vs (a), (b) vs (b), (c) vs mergekit's (b).

Run::

    /work/venv/bin/python benchmarks/bench_passthrough.py [--small] [--rounds 3]
        [--workdir /tmp/hubmerge-bench] [--mergekit /work/bench-venv/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import SMALL, make_synthetic_llama  # noqa: E402

#: Scales of the six slices of config (a), applied to o_proj and down_proj.
SLICE_SCALES: list[float] = [1.0, 1.5, 1.5, 2.0, 2.0, 2.5]
#: Number of copies of the last layer appended by configs (b) and (c).
APPEND: int = 8
#: Targets: hubmerge/mergekit wall, hubmerge/cp wall, hubmerge/mergekit peak RSS.
TARGET_WALL_VS_MERGEKIT = 0.5
TARGET_WALL_VS_CP = 3.0
TARGET_RSS_VS_MERGEKIT = 0.15
#: Flags tried for mergekit-yaml, kept when its ``--help`` lists them: the CPU-speed options
#: of mergekit 0.1.x (no ``--cuda``). Progress bars off so they do not cost terminal time.
MERGEKIT_FAST_FLAGS: list[str] = ["--lazy-unpickle", "--quiet"]

_RSS_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'maxrss_kb': ru.ru_maxrss}))\n"
)


@dataclass
class Sample:
    """One timed run of one command."""

    wall_s: float
    rss_mb: float
    rc: int


@dataclass
class Job:
    """A command to benchmark: ``argv`` writes into ``out`` (deleted before each run)."""

    key: str
    tool: str
    config: str
    argv: list[str]
    out: Path
    samples: list[Sample] = field(default_factory=list)
    failed: str | None = None

    def median_wall(self) -> float | None:
        ok = [s.wall_s for s in self.samples if s.rc == 0]
        return statistics.median(ok) if ok else None

    def median_rss(self) -> float | None:
        ok = [s.rss_mb for s in self.samples if s.rc == 0]
        return statistics.median(ok) if ok else None


# --------------------------------------------------------------------------- configs


def slice_entry(model: str, start: int, end: int, scale: float) -> dict[str, Any]:
    """A mergekit slice of ``model`` layers [start, end) with o_proj/down_proj scaled."""
    return {
        "sources": [
            {
                "model": model,
                "layer_range": [start, end],
                "parameters": {
                    "scale": [
                        {"filter": "o_proj", "value": scale},
                        {"filter": "down_proj", "value": scale},
                        {"value": 1.0},
                    ]
                },
            }
        ]
    }


def make_configs(model: Path, num_layers: int, cfg_dir: Path) -> dict[str, Path]:
    """Write configs (a), (b), (c) for a ``num_layers``-layer ``model``; return their paths."""
    if num_layers % len(SLICE_SCALES):
        raise ValueError(f"num_layers must be a multiple of {len(SLICE_SCALES)}")
    m = str(model)
    step = num_layers // len(SLICE_SCALES)
    a = {
        "slices": [slice_entry(m, i * step, (i + 1) * step, s) for i, s in enumerate(SLICE_SCALES)],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }
    b = {
        "slices": [slice_entry(m, 0, num_layers, 1.0)]
        + [slice_entry(m, num_layers - 1, num_layers, 0.0) for _ in range(APPEND)],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }
    c = {"merge_method": "block_expansion", "model": m, "append": APPEND, "dtype": "bfloat16"}
    cfg_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, cfg in (("a", a), ("b", b), ("c", c)):
        p = cfg_dir / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
        paths[name] = p
    return paths


CONFIG_TITLES: dict[str, str] = {
    "a": "scaled passthrough (6 slices)",
    "b": f"expansion as slices (+{APPEND})",
    "c": f"block_expansion native (+{APPEND})",
}


# --------------------------------------------------------------------------- measuring


def run_measured(argv: list[str], log: Path, env: dict[str, str]) -> Sample:
    """Run ``argv`` in a fresh measuring process; return wall time, peak RSS and exit code."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss", delete=False) as f:
        stats = Path(f.name)
    try:
        if Path("/usr/bin/time").exists():
            full = ["/usr/bin/time", "-v", "-o", str(stats), *argv]
        else:
            full = [sys.executable, "-c", _RSS_WRAPPER, str(stats), *argv]
        with log.open("w") as lf:
            t0 = time.perf_counter()
            proc = subprocess.run(full, stdout=lf, stderr=subprocess.STDOUT, env=env)
            wall = time.perf_counter() - t0
        text = stats.read_text()
        if text.lstrip().startswith("{"):
            d = json.loads(text)
            return Sample(wall, d["maxrss_kb"] / 1024, d["rc"])
        m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
        rss = int(m.group(1)) / 1024 if m else float("nan")
        return Sample(wall, rss, proc.returncode)
    finally:
        stats.unlink(missing_ok=True)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_job(job: Job, log_dir: Path, env: dict[str, str], label: str) -> Sample:
    """Delete the job's output, flush dirty pages, run it once; mark it failed on error."""
    if job.out.exists():
        shutil.rmtree(job.out)
    os.sync()
    log = log_dir / f"{job.key}.{label}.log"
    s = run_measured(job.argv, log, env)
    status = "ok" if s.rc == 0 else f"FAILED rc={s.rc}"
    print(f"  {label:<8} {job.key:<12} {s.wall_s:8.2f} s {s.rss_mb:9.1f} MB  {status}", flush=True)
    if s.rc != 0:
        job.failed = f"rc={s.rc}, log {log}"
        print("    " + _tail(log).replace("\n", "\n    "), flush=True)
    return s


def probe(argv: list[str], env: dict[str, str]) -> tuple[bool, str]:
    """Run ``argv`` (a ``--help``), return (worked, output)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return p.returncode == 0, p.stdout + p.stderr


def tool_version(python: Path, dist: str) -> str | None:
    """Installed version of distribution ``dist`` in the venv of ``python``, if any."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        p = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return p.stdout.strip() if p.returncode == 0 else None


# --------------------------------------------------------------------------- correctness


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file for a model folder (all ``*.safetensors``)."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = f
    return out


def compare_outputs(mine: Path, ref: Path) -> dict[str, Any]:
    """Compare every tensor of two model folders: names, dtype, shape and bits.

    Returns a dict with ``pass`` (names equal and every tensor bitwise equal), the names only
    in one side, per-tensor mismatches (with max abs diff and whether the values are equal
    despite differing bits, e.g. -0.0 vs +0.0), the overall max abs diff, and the keys of
    ``config.json`` whose values differ (informative only).
    """
    import torch
    from safetensors import safe_open

    a_files, b_files = _tensor_files(mine), _tensor_files(ref)
    only_mine = sorted(set(a_files) - set(b_files))
    only_ref = sorted(set(b_files) - set(a_files))
    mismatches: list[dict[str, Any]] = []
    max_diff = 0.0
    common = sorted(set(a_files) & set(b_files))
    handles: dict[Path, Any] = {}
    try:
        for name in common:
            for f in (a_files[name], b_files[name]):
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt").__enter__()
            ta = handles[a_files[name]].get_tensor(name)
            tb = handles[b_files[name]].get_tensor(name)
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                mismatches.append(
                    {
                        "name": name,
                        "problem": f"{ta.dtype}{tuple(ta.shape)} vs {tb.dtype}{tuple(tb.shape)}",
                    }
                )
                continue
            bits_equal = torch.equal(
                ta.contiguous().view(torch.uint8), tb.contiguous().view(torch.uint8)
            )
            if bits_equal:
                continue
            diff = (ta.float() - tb.float()).abs()
            d = float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0
            max_diff = max(max_diff, d)
            mismatches.append(
                {
                    "name": name,
                    "problem": "bits differ",
                    "max_abs_diff": d,
                    "values_equal": bool(torch.equal(ta, tb)),
                    "n_diff_elems": int((ta.float() != tb.float()).sum()),
                    "numel": ta.numel(),
                }
            )
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    cfg_diff: dict[str, Any] = {}
    try:
        ca = json.loads((mine / "config.json").read_text())
        cb = json.loads((ref / "config.json").read_text())
        for k in sorted(set(ca) | set(cb)):
            if k != "transformers_version" and ca.get(k) != cb.get(k):
                cfg_diff[k] = [ca.get(k, "<missing>"), cb.get(k, "<missing>")]
    except (OSError, json.JSONDecodeError) as e:
        cfg_diff["<error>"] = str(e)
    ok = not only_mine and not only_ref and not mismatches and bool(common)
    return {
        "pass": ok,
        "tensors_compared": len(common),
        "only_in_hubmerge": only_mine,
        "only_in_reference": only_ref,
        "mismatches": mismatches,
        "max_abs_diff": max_diff,
        "config_json_diff": cfg_diff,
    }


def print_comparison(title: str, r: dict[str, Any]) -> None:
    """Print one comparison result, listing the offending tensor names."""
    verdict = "PASS" if r["pass"] else "FAIL"
    print(
        f"  {title:<46} {verdict}  tensors={r['tensors_compared']} "
        f"max|diff|={r['max_abs_diff']:.3g} mismatched={len(r['mismatches'])}"
    )
    for key in ("only_in_hubmerge", "only_in_reference"):
        if r[key]:
            print(f"    {key} ({len(r[key])}): {', '.join(r[key][:10])}")
    for m in r["mismatches"][:20]:
        extra = ""
        if "max_abs_diff" in m:
            extra = (
                f" max|diff|={m['max_abs_diff']:.3g} values_equal={m['values_equal']}"
                f" ({m['n_diff_elems']}/{m['numel']} elems differ by value)"
            )
        print(f"    {m['name']}: {m['problem']}{extra}")
    if len(r["mismatches"]) > 20:
        print(f"    ... {len(r['mismatches']) - 20} more")
    if r["config_json_diff"]:
        print(f"    config.json differs (info): {json.dumps(r['config_json_diff'])}")


# --------------------------------------------------------------------------- report


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _verdict(r: float | None, target: float) -> str:
    return "n/a" if r is None else ("PASS" if r <= target else "FAIL")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the model and configs, run all rounds, report and check."""
    here = Path(sys.executable).parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hubmerge-bench"))
    ap.add_argument("--mergekit", default="/work/bench-venv/bin/mergekit-yaml")
    ap.add_argument(
        "--hubmerge",
        default=str(here / "hubmerge") if (here / "hubmerge").exists() else "hubmerge",
        help="hubmerge console script (default: the one beside this Python, else PATH)",
    )
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags (quoted)")
    ap.add_argument("--small", action="store_true", help=f"tiny model for a quick check {SMALL}")
    ap.add_argument("--keep-outputs", action="store_true", help="do not delete merge outputs")
    args = ap.parse_args(argv)

    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")

    # -- model
    size = dict(SMALL) if args.small else {}
    model_dir = work / ("model-small" if args.small else "model")
    t0 = time.perf_counter()
    make_synthetic_llama(model_dir, verbose=True, **size)
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    print(
        f"model: {model_dir} ({model_bytes / 1e9:.2f} GB, {num_layers} layers), "
        f"ready in {time.perf_counter() - t0:.1f} s"
    )
    cfgs = make_configs(model_dir, num_layers, work / "configs")

    # -- tools
    notes: list[str] = []
    hub = shutil.which(args.hubmerge) or args.hubmerge
    hub_ok, hub_out = probe([hub, "merge", "--help"], env)
    if not hub_ok:
        notes.append(f"hubmerge skipped: `{hub} merge --help` failed: {hub_out.strip()[:200]}")
    mk = shutil.which(args.mergekit) or args.mergekit
    mk_ok, mk_help = probe([mk, "--help"], env)
    mk_flags: list[str] = []
    mk_version = None
    if mk_ok:
        mk_flags = [f for f in MERGEKIT_FAST_FLAGS if f in mk_help] + args.mergekit_args.split()
        mk_version = tool_version(Path(mk).parent / "python", "mergekit")
    else:
        notes.append(f"mergekit skipped: `{mk} --help` failed: {mk_help.strip()[:200]}")
    for n in notes:
        print("NOTE: " + n)

    outs = work / "out"
    outs.mkdir(exist_ok=True)
    jobs: list[Job] = []
    for c in ("a", "b", "c"):
        if hub_ok:
            o = outs / f"hubmerge-{c}"
            jobs.append(Job(o.name, "hubmerge", c, [hub, "merge", str(cfgs[c]), str(o)], o))
        if mk_ok and c != "c":
            o = outs / f"mergekit-{c}"
            jobs.append(Job(o.name, "mergekit", c, [mk, str(cfgs[c]), str(o), *mk_flags], o))
    o = outs / "cp"
    jobs.append(Job(o.name, "cp", "-", ["cp", "-r", str(model_dir), str(o)], o))

    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    print(f"\nwarm-up (one run each), then {args.rounds} rounds; logs in {log_dir}")
    for j in jobs:
        run_job(j, log_dir, env, "warmup")
    for r in range(args.rounds):
        live = [j for j in jobs if j.failed is None]
        k = r % len(live) if live else 0
        for j in live[k:] + live[:k]:  # rotate the order so no command always goes first
            if j.failed is None:
                j.samples.append(run_job(j, log_dir, env, f"round{r + 1}"))

    # -- table
    by = {j.key: j for j in jobs}
    cp_wall = by["cp"].median_wall()
    print()
    hdr = (
        f"{'command':<44} {'wall s':>8} {'RSS MB':>9} {'hub/mk t':>9} {'hub/mk RSS':>10} "
        f"{'hub/cp t':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    results: dict[str, Any] = {}
    targets: dict[str, dict[str, Any]] = {}
    for j in jobs:
        w, rss = j.median_wall(), j.median_rss()
        title = (
            "cp -r MODEL OUT (floor)"
            if j.tool == "cp"
            else (f"{j.tool} {j.config}: {CONFIG_TITLES[j.config]}")
        )
        row: dict[str, Any] = {
            "tool": j.tool,
            "config": j.config,
            "argv": j.argv,
            "median_wall_s": w,
            "median_rss_mb": rss,
            "samples": [asdict(s) for s in j.samples],
            "failed": j.failed,
        }
        cols = ["", "", ""]
        if j.tool == "hubmerge":
            ref = by.get(f"mergekit-{'b' if j.config == 'c' else j.config}")
            rw = _ratio(w, ref.median_wall() if ref else None)
            rr = _ratio(rss, ref.median_rss() if ref else None)
            rc = _ratio(w, cp_wall)
            row.update(wall_vs_mergekit=rw, rss_vs_mergekit=rr, wall_vs_cp=rc)
            cols = [_fmt(rw), _fmt(rr, ".3f"), _fmt(rc)]
            targets[j.config] = {
                f"wall <= {TARGET_WALL_VS_MERGEKIT}x mergekit": [
                    rw,
                    _verdict(rw, TARGET_WALL_VS_MERGEKIT),
                ],
                f"wall <= {TARGET_WALL_VS_CP}x cp": [rc, _verdict(rc, TARGET_WALL_VS_CP)],
                f"peak RSS <= {TARGET_RSS_VS_MERGEKIT}x mergekit": [
                    rr,
                    _verdict(rr, TARGET_RSS_VS_MERGEKIT),
                ],
            }
        results[j.key] = row
        print(
            f"{title:<44} {_fmt(w):>8} {_fmt(rss, '.1f'):>9} {cols[0]:>9} {cols[1]:>10} "
            f"{cols[2]:>9}" + ("  FAILED" if j.failed else "")
        )

    if targets and args.small:
        print("\n(--small: the model is tiny, so start-up dominates; targets mean full size)")
    if targets:
        print("\ntargets (hubmerge; config c is held against mergekit's b):")
        for c, t in targets.items():
            for what, (val, verdict) in t.items():
                print(f"  {c}  {what:<32} {_fmt(val, '.3f'):>7}  {verdict}")

    # -- correctness
    checks: dict[str, Any] = {}
    pairs = [
        ("a", "hubmerge-a", "mergekit-a"),
        ("b", "hubmerge-b", "mergekit-b"),
        ("c", "hubmerge-c", "mergekit-b"),
        ("c vs b", "hubmerge-c", "hubmerge-b"),
    ]
    todo = [
        (n, x, y)
        for n, x, y in pairs
        if x in by
        and y in by
        and by[x].failed is None
        and by[y].failed is None
        and by[x].out.exists()
        and by[y].out.exists()
    ]
    if todo:
        print("\ncorrectness (every tensor bitwise equal):")
        for n, x, y in todo:
            r = compare_outputs(by[x].out, by[y].out)
            checks[f"{x} vs {y}"] = r
            print_comparison(f"{n}: {x} vs {y}", r)
    else:
        print("\ncorrectness: skipped (needs both hubmerge's and mergekit's outputs)")

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "small": args.small,
        "model": {"path": str(model_dir), "bytes": model_bytes, "num_layers": num_layers},
        "rounds": args.rounds,
        "mergekit": {"path": mk, "version": mk_version, "flags": mk_flags, "ran": mk_ok},
        "hubmerge": {"path": hub, "ran": hub_ok},
        "notes": notes,
        "results": results,
        "targets": targets,
        "correctness": checks,
    }
    out_json = work / ("bench_passthrough_small.json" if args.small else "bench_passthrough.json")
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures written to {out_json}")
    if not args.keep_outputs:
        for j in jobs:
            shutil.rmtree(j.out, ignore_errors=True)
    failed = [j.key for j in jobs if j.failed]
    wrong = [k for k, r in checks.items() if not r["pass"]]
    if failed or wrong:
        print(f"PROBLEMS: failed runs {failed}, output mismatches {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
