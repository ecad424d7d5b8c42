"""OLM's greedy search: at each layer position keep the pool's layer that ranks best.

The current layer is always a candidate, with the scores it already has, so no position can
make the model rank worse on the selection data; pool layers identical in origin to the current
one are not evaluated twice. Without `base_model`, every pool model is evaluated whole and the
best-ranked one becomes the base.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hubmerge.config import OlmConfig
from hubmerge.datasets import Sample, load_conversations
from hubmerge.methods.olm.evaluate import Limits, WorkingModel
from hubmerge.methods.olm.report import (
    REPORT_FILE,
    load_report,
    new_report,
    save_report,
    scores_from_json,
    scores_json,
)
from hubmerge.methods.olm.scoring import Score, aggregate
from hubmerge.sources import ModelSource


@dataclass
class SearchResult:
    base: str
    #: The pool model each output layer comes from (same index in that model).
    winners: list[str]
    report: dict[str, Any]
    model: WorkingModel


def select_samples(config: OlmConfig) -> dict[str, tuple[str, list[Sample]]]:
    """Each dataset's mode and its samples: a seeded subset when it has more than asked for."""
    chosen = {}
    for name, spec in config.dataset.items():
        samples = load_conversations(Path(name))
        wanted = spec.samples or config.samples
        if len(samples) > wanted:
            keep = sorted(random.Random(config.seed).sample(range(len(samples)), wanted))
            samples = [samples[i] for i in keep]
        chosen[name] = (spec.mode, samples)
    return chosen


def search(
    config: OlmConfig,
    sources: Mapping[str, ModelSource],
    *,
    device: str,
    state: Path | None,
    restart: bool = False,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Run (or resume) the search; `state` is where the report lives between runs."""
    samples = select_samples(config)
    pool = config.models
    report_path = state / REPORT_FILE if state else None
    report = (
        load_report(report_path, config, restart=restart) if report_path else new_report(config)
    )
    torch.manual_seed(config.seed)

    first = report["base_model"] or config.base_model or pool[0]
    working = WorkingModel(
        sources[first],
        samples,
        limits=Limits(
            config.limits.exact.max_new_tokens,
            config.limits.quality.max_new_tokens,
            config.limits.quality.min_words,
            config.limits.quality.target_words,
        ),
        batch_size=config.batch_size,
        device=device,
        dtype=getattr(torch, config.dtype or "float32"),
    )
    names = list(samples)

    def save() -> None:
        if report_path:
            save_report(report_path, report)

    loaded = first
    if report["base_model"] is None:
        loaded = _choose_base(config, sources, working, report, names, progress)
        save()
    base = report["base_model"]
    if loaded != base:
        working.load_model(sources[base])

    depth = sources[base].num_layers
    winners = [base] * depth
    current = scores_from_json(report["base_scores"])
    for record in report["layers"]:  # resume: re-apply what earlier runs decided
        position, winner = record["layer"], record["best_model"]
        winners[position] = winner
        if winner != base:
            working.load_layer(position, sources[winner], position)
        current = scores_from_json(record["scores"][winner])

    done = {record["layer"] for record in report["layers"]}
    order = range(depth) if config.direction == "forward" else range(depth - 1, -1, -1)
    remaining = [p for p in order if p not in done]
    rivals = [m for m in pool if m != base]
    advance = (
        progress("OLM positions x candidates", len(remaining) * len(rivals)) if progress else None
    )
    for position in remaining:
        began = time.perf_counter()
        working.cache_prefix(position)
        candidates = [winners[position], *[m for m in pool if m != winners[position]]]
        table: dict[str, dict[str, Score]] = {winners[position]: current}
        for model in candidates[1:]:
            working.load_layer(position, sources[model], position)
            table[model] = dict(zip(names, working.evaluate(start=position), strict=True))
            if advance:
                advance()
        index, merit = aggregate(
            [[table[m][n] for n in names] for m in candidates], config.aggregate
        )
        winner = candidates[index]
        if winner != candidates[-1]:
            working.load_layer(position, sources[winner], position)
        winners[position] = winner
        current = table[winner]
        report["layers"].append(
            {
                "layer": position,
                "candidates": candidates,
                "current": candidates[0],
                "scores": {m: scores_json(table[m]) for m in candidates},
                "metrics": {n: {m: table[m][n].value for m in candidates} for n in names},
                "merit": dict(zip(candidates, merit, strict=True)),
                "best_model": winner,
                "seconds": round(time.perf_counter() - began, 4),
            }
        )
        save()
        if log:
            summary = ", ".join(f"{Path(n).stem} {current[n].value:.4g}" for n in names)
            log(f"layer {position}: {winner} ({summary})")
    report["complete"] = True
    report["evaluation"] = vars(working.counters)
    save()
    return SearchResult(base, winners, report, working)


def _choose_base(
    config: OlmConfig,
    sources: Mapping[str, ModelSource],
    working: WorkingModel,
    report: dict[str, Any],
    names: list[str],
    progress: Callable[[str, int], Callable[[], None]] | None,
) -> str:
    """Evaluate the configured base, or every pool model whole and keep the best-ranked.

    Returns the model the working model holds afterwards.
    """
    if config.base_model:
        report["base_model"] = config.base_model
        report["base_scores"] = scores_json(dict(zip(names, working.evaluate(), strict=True)))
        return config.base_model
    advance = progress("OLM base selection", len(config.models)) if progress else None
    table: dict[str, dict[str, Score]] = {}
    for i, model in enumerate(config.models):
        if i:
            working.load_model(sources[model])
        table[model] = dict(zip(names, working.evaluate(), strict=True))
        if advance:
            advance()
    index, merit = aggregate(
        [[table[m][n] for n in names] for m in config.models], config.aggregate
    )
    base = config.models[index]
    report["base_model"] = base
    report["base_scores"] = scores_json(table[base])
    report["base_selection"] = {
        "scores": {m: scores_json(table[m]) for m in config.models},
        "merit": dict(zip(config.models, merit, strict=True)),
    }
    return config.models[-1]
