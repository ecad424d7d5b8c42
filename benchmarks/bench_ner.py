"""Benchmark hubmerge's NER route against per-matrix ``torch.linalg.svdvals`` in float32.

What it measures, and why this way:

* A whole-model NER scan of the synthetic ~2.4 GB bf16 Llama of the passthrough benchmark
  (``benchmarks/synth.py``, 24 layers, hidden 2048; cached under ``--workdir``): every 2-D
  weight, embeddings and ``lm_head`` included, read one tensor at a time as a merge reads them.
* Two routes in the same run. hubmerge's is ``hubmerge.methods.ner.scores.score_tensors`` as a merge
  calls it, without the cache: float64 Gram eigenvalues (SVD fallback for rank-deficient matrices),
  on the CPU one single-threaded matrix per core. The reference is the public implementation's: the
  same read, then ``torch.linalg.svdvals`` in float32, one matrix after another with torch's threads
  (``--reference-threads`` to change them). Both turn singular values into NER with the same
  function, so only the way to the spectrum differs.
* The machine may be shared and noisy, so the routes alternate block by block (embeddings and
  ``lm_head``, then each layer's matrices), and which goes first alternates too: a change of
  load hits both alike. Reported: seconds per route for the layers, the embeddings and lm_head
  and the whole model, their ratio, seconds per GB of weights scanned, and the largest absolute
  NER difference between the routes.

Run::

    /work/venv/bin/python benchmarks/bench_ner.py [--small] [--device cuda]
        [--reference-threads N] [--workdir /tmp/hubmerge-bench] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import SMALL, make_synthetic_llama  # noqa: E402

from hubmerge import arch  # noqa: E402
from hubmerge.devices import check_device  # noqa: E402
from hubmerge.methods.ner import scores as ner  # noqa: E402
from hubmerge.sources import ModelSource  # noqa: E402
from hubmerge.tensorfile import TensorInfo, read_array, to_float32  # noqa: E402

#: Targets: hubmerge at least this many times faster, NER within this of the reference.
TARGET_SPEEDUP = 2.0
TARGET_MAX_DIFF = 1e-5
ROW = "{:>22} {:>4} {:>6} {:>11} {:>10} {:>7} {:>11}"

Route = Callable[[list[TensorInfo], str], dict[TensorInfo, float]]


@dataclass
class Part:
    """Totals over one part of the model (the layers, or the embeddings and lm_head)."""

    count: int = 0
    nbytes: int = 0
    hubmerge_s: float = 0.0
    svdvals_s: float = 0.0
    max_diff: float = 0.0

    def row(self, name: str) -> str:
        return ROW.format(
            name,
            self.count,
            f"{self.nbytes / 1e9:.2f}",
            f"{self.hubmerge_s:.2f}",
            f"{self.svdvals_s:.2f}",
            f"{self.svdvals_s / self.hubmerge_s:.2f}x",
            f"{self.max_diff:.2e}",
        )


def hubmerge_route(block: list[TensorInfo], device: str) -> dict[TensorInfo, float]:
    """hubmerge's route, as a merge runs it (without the cache)."""
    return ner.score_tensors(block, normalize="none", device=device, cache=None)


def reference_route(block: list[TensorInfo], device: str) -> dict[TensorInfo, float]:
    """The public implementation's route: float32 ``svdvals`` of each raw matrix in turn."""
    scores = {}
    for info in block:
        values = to_float32(read_array(info), info.dtype).reshape(info.shape)
        matrix = torch.from_numpy(values).to(device, torch.float32)
        scores[info] = ner.ner_of(torch.linalg.svdvals(matrix).double().cpu())
    return scores


def blocks(model: Path) -> dict[str, list[TensorInfo]]:
    """The model's 2-D tensors, grouped as a merge meets them: the embeddings and lm_head
    (scored side by side, being the largest), then each layer's matrices."""
    source = ModelSource.open(str(model))
    groups: dict[str, list[TensorInfo]] = {}
    for info in sorted(source.tensors.values(), key=lambda i: (str(i.file), i.offset)):
        if len(info.shape) == 2:
            layer = arch.split_layer_name(info.name)
            key = f"layer {layer[0]}" if layer else "embeddings + lm_head"
            groups.setdefault(key, []).append(info)
    return dict(sorted(groups.items(), key=lambda item: item[0].startswith("layer")))


def scan(model: Path, device: str, reference_threads: int) -> dict[str, Part]:
    """Score every block with both routes, alternating which goes first; totals per part."""
    parts: dict[str, Part] = defaultdict(Part)
    default_threads = torch.get_num_threads()
    routes: list[tuple[str, Route, int]] = [
        ("hubmerge", hubmerge_route, default_threads),
        ("svdvals", reference_route, reference_threads),
    ]
    groups = blocks(model)
    for n, (label, block) in enumerate(groups.items()):
        seconds, scores = {}, {}
        for name, route, threads in routes[:: -1 if n % 2 else 1]:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            scores[name] = route(block, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
        torch.set_num_threads(default_threads)
        part = parts["layers" if label.startswith("layer") else label]
        part.count += len(block)
        part.nbytes += sum(i.nbytes for i in block)
        part.hubmerge_s += seconds["hubmerge"]
        part.svdvals_s += seconds["svdvals"]
        diffs = (abs(scores["hubmerge"][i] - scores["svdvals"][i]) for i in block)
        part.max_diff = max(part.max_diff, *diffs)
        print(
            f"  {n + 1:>3}/{len(groups)} {label:<22} hubmerge {seconds['hubmerge']:7.2f} s   "
            f"svdvals {seconds['svdvals']:7.2f} s",
            flush=True,
        )
    return dict(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help=f"tiny model for a quick check {SMALL}")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hubmerge-bench"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--reference-threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads for the svdvals route (default: torch's, as the public code runs)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    work: Path = args.workdir.resolve()
    model = work / ("model-small" if args.small else "model")
    make_synthetic_llama(model, verbose=True, **(dict(SMALL) if args.small else {}))
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"svdvals with {args.reference_threads}"
    )
    parts = scan(model, check_device(args.device, allow_auto=False), args.reference_threads)

    total = Part()
    for part in parts.values():
        total.count += part.count
        total.nbytes += part.nbytes
        total.hubmerge_s += part.hubmerge_s
        total.svdvals_s += part.svdvals_s
        total.max_diff = max(total.max_diff, part.max_diff)
    gb = total.nbytes / 1e9
    speedup = total.svdvals_s / total.hubmerge_s
    print("\nwhole-model NER scan, hubmerge's route beside per-matrix float32 svdvals:")
    print(ROW.format("", "n", "GB", "hubmerge s", "svdvals s", "ratio", "max |dNER|"))
    for name, part in parts.items():
        print(part.row(name))
    print(total.row("whole model"))
    per_gb = (f"{total.hubmerge_s / gb:.2f}", f"{total.svdvals_s / gb:.2f}")
    print(ROW.format("seconds per GB", "", "", *per_gb, "", ""))
    ok_speed, ok_diff = speedup >= TARGET_SPEEDUP, total.max_diff <= TARGET_MAX_DIFF
    print(
        f"\ntargets: speedup {speedup:.2f}x >= {TARGET_SPEEDUP}x {'PASS' if ok_speed else 'FAIL'}; "
        f"max |dNER| {total.max_diff:.1e} <= {TARGET_MAX_DIFF:.0e} "
        f"{'PASS' if ok_diff else 'FAIL'}"
    )
    if args.small:
        print("(--small: matrices are tiny, so overheads dominate; the targets mean full size)")
    if args.json:
        figures = {
            "machine": platform.platform(),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "reference_threads": args.reference_threads,
            "gb": gb,
            "speedup": speedup,
            "seconds_per_gb": {"hubmerge": total.hubmerge_s / gb, "svdvals": total.svdvals_s / gb},
            "parts": {name: asdict(part) for name, part in {**parts, "total": total}.items()},
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok_diff and (ok_speed or args.small) else 1


if __name__ == "__main__":
    sys.exit(main())
