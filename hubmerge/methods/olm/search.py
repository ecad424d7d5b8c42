"""OLM's greedy search: at each layer position keep the candidate that scores best.

Candidates at a position are every pool model's layer there (`candidates: [layers]`, the seeds'
OLM) and, on request, blends of them: the element-wise mean of the pool's layers (`mean`) and
task arithmetic, base + lam x sum(model - base) for each lam of `lambdas` (`task_arithmetic`).
Skills compete for the same layers, so picking whole layers alone rarely combines them; a blend
can. Without `base_model` the whole-model versions of all of these compete for the starting
model. With `granularity: module` a position's attention and MLP are two positions.

The current layer is always a candidate, with the scores it already has, and ties go to it, so
no position can make the model score worse on the selection data. With `acceptance.test: sign`
a better-scoring candidate must also be better on significantly more samples than it is worse
(`scoring.sign_test`), so that noise in a small selection set does not decide swaps.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hubmerge import arch
from hubmerge.config import OlmConfig
from hubmerge.datasets import Sample, load_conversations
from hubmerge.folder import OLM_REPORT_FILE, OlmPosition, OlmReport, OlmSelection
from hubmerge.methods.olm import PARTS, part_of
from hubmerge.methods.olm.evaluate import Limits, WorkingModel
from hubmerge.methods.olm.report import (
    load_report,
    new_report,
    save_report,
    scores_from_json,
    scores_json,
)
from hubmerge.methods.olm.scoring import Score, aggregate, sign_test
from hubmerge.methods.olm.workers import Layout, Position, Workers, WorkerSetup
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import DTYPE_CODES, TensorInfo, read_weighted_sum

Tensors = dict[str, TensorInfo | Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class Candidate:
    """A pool model, or a blend of pool models: (model, weight) terms, summed tensor by tensor."""

    label: str
    terms: tuple[tuple[str, float], ...]

    @property
    def model(self) -> str | None:
        """The pool model this candidate is, or None for a blend."""
        (model, weight), *rest = self.terms
        return model if not rest and weight == 1.0 else None


@dataclass
class SearchResult:
    #: The label of the starting model (a pool model, or a blend's label).
    base: str
    #: The label of the candidate chosen at every position.
    winners: dict[Position, str]
    candidates: dict[str, Candidate]
    report: OlmReport
    #: The working model as the search left it (None when workers did the scoring).
    model: WorkingModel | None


def blend_base(config: OlmConfig) -> str:
    """The model task arithmetic is relative to."""
    return config.blend_base or config.base_model or config.models[0]


def all_candidates(config: OlmConfig) -> tuple[list[Candidate], list[Candidate]]:
    """(the pool models, the blends) that `config` asks for, in a fixed order."""
    pool = [Candidate(m, ((m, 1.0),)) for m in config.models]
    blends = []
    if "mean" in config.candidates and len(config.models) > 1:
        share = 1.0 / len(config.models)
        blends.append(Candidate("mean", tuple((m, share) for m in config.models)))
    if "task_arithmetic" in config.candidates:
        base = blend_base(config)
        donors = [m for m in config.models if m != base]
        for lam in config.lambdas if donors else []:
            # In pool order, like the mean: a recipe slice sums its sources in one order.
            own = 1.0 - lam * len(donors)
            terms = tuple((m, own if m == base else lam) for m in config.models)
            if base not in config.models:
                terms = ((base, own), *terms)
            blends.append(Candidate(f"task_arithmetic({lam:g})", terms))
    return pool, blends


def select_samples(config: OlmConfig) -> dict[str, tuple[str, list[Sample]]]:
    """Each dataset's mode and its samples: a seeded subset when it has more than asked for."""
    chosen: dict[str, tuple[str, list[Sample]]] = {}
    for name, spec in config.dataset.items():
        samples = load_conversations(name)
        wanted = spec.samples or config.samples
        if len(samples) > wanted:
            keep = sorted(random.Random(config.seed).sample(range(len(samples)), wanted))
            samples = [samples[i] for i in keep]
        chosen[name] = (spec.mode, samples)
    return chosen


class _Tensors:
    """The tensors that make a candidate, whole or at one position, for `WorkingModel.load`."""

    def __init__(self, config: OlmConfig, sources: Mapping[str, ModelSource]) -> None:
        self.sources = sources
        #: Blends are computed as the writer computes them: in `dtype`, else as stored.
        self.compute = DTYPE_CODES[config.dtype] if config.dtype else None

    def _value(
        self, candidate: Candidate, pick: Callable[[ModelSource], TensorInfo]
    ) -> TensorInfo | Callable[[], torch.Tensor]:
        if candidate.model is not None:
            return pick(self.sources[candidate.model])
        terms = [(pick(self.sources[m]), w) for m, w in candidate.terms]
        compute = self.compute or terms[0][0].dtype
        return lambda: read_weighted_sum(terms, compute)

    def whole(self, candidate: Candidate) -> Tensors:
        names = self.sources[candidate.terms[0][0]].tensors
        return {n: self._value(candidate, lambda s, n=n: s.tensors[n]) for n in names}  # type: ignore[misc]

    def at(self, candidate: Candidate, position: Position) -> Tensors:
        layer, part = position
        suffixes = self.sources[candidate.terms[0][0]].layers[layer]
        return {
            arch.layer_name(layer, s): self._value(
                candidate,
                lambda src, s=s: src.layers[layer][s],  # type: ignore[misc]
            )
            for s in suffixes
            if part is None or part_of(s) == part
        }


def whole_model_tensors(
    config: OlmConfig, sources: Mapping[str, ModelSource], candidate: Candidate
) -> Tensors:
    """Every tensor of `candidate` as a whole model, as OLM scores it and the writer writes it."""
    return _Tensors(config, sources).whole(candidate)


def positions(config: OlmConfig, depth: int) -> list[Position]:
    """Every position in search order (a layer's attention before its MLP, going forward)."""
    parts: tuple[str | None, ...] = PARTS if config.granularity == "module" else (None,)
    order = [(layer, part) for layer in range(depth) for part in parts]
    return order if config.direction == "forward" else order[::-1]


def evaluate_candidates(
    working: WorkingModel | Workers,
    tensors: Callable[[Candidate], Tensors],
    challengers: list[Candidate],
    start: int,
    advance: Callable[[], None] | None,
    at: tuple[Layout, Position] | None = None,
) -> dict[str, list[Score]]:
    """Load each challenger into the working model and score it (from layer `start`).

    The one place candidates are evaluated: positions and the starting-model choice alike.
    The working model holds the last challenger afterwards. With `Workers`, the challengers
    are scored in parallel, each worker bringing its own working model to `at` (the layout the
    search holds and the position; None: whole models).
    """
    if isinstance(working, Workers):
        layout, position = at if at else (None, None)
        return working.evaluate(layout, position, challengers, start, advance)
    scored = {}
    for candidate in challengers:
        working.load(tensors(candidate))
        scored[candidate.label] = working.evaluate(start=start)
        if advance:
            advance()
    return scored


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
    names = list(samples)
    modes = [mode for mode, _ in samples.values()]
    pool, blends = all_candidates(config)
    starters = [*pool, *blends]
    if config.base_model:
        starters = [Candidate(config.base_model, ((config.base_model, 1.0),))]
    at_positions = (pool if "layers" in config.candidates else []) + blends
    by_label = {c.label: c for c in [*pool, *blends, *starters]}
    report_path = state / OLM_REPORT_FILE if state else None
    report = (
        load_report(report_path, config, restart=restart) if report_path else new_report(config)
    )
    torch.manual_seed(config.seed)
    tensors = _Tensors(config, sources)

    first = by_label[report.base_model or starters[0].label]
    limits = Limits(
        config.limits.exact.max_new_tokens,
        config.limits.quality.max_new_tokens,
        config.limits.quality.min_words,
        config.limits.quality.target_words,
    )
    dtype = config.dtype or "float32"
    devices = config.worker_devices(device)
    # With workers, every evaluation runs in them: this process holds no model.
    workers = (
        Workers(
            devices,
            WorkerSetup(
                sources[first.terms[0][0]], samples, limits, config.batch_size, dtype,
                tensors, by_label, torch.get_num_threads(),
            ),
        )
        if devices
        else None
    )  # fmt: skip
    working = (
        WorkingModel(
            sources[first.terms[0][0]],
            samples,
            limits=limits,
            batch_size=config.batch_size,
            device=device,
            dtype=getattr(torch, dtype),
        )
        if workers is None
        else None
    )
    scorer: WorkingModel | Workers = workers or working  # type: ignore[assignment]

    def save() -> None:
        if report_path:
            save_report(report_path, report)

    def choose(table: dict[str, list[Score]], labels: list[str]) -> tuple[int, list[float]]:
        return aggregate([table[label] for label in labels], config.aggregate, modes)

    def as_json(scores: list[Score]) -> dict[str, dict[str, Any]]:
        return scores_json(dict(zip(names, scores, strict=True)))

    holds = first.model  # the working model is this pool model as loaded
    if report.base_model is None:
        advance = progress("OLM starting model", len(starters)) if progress else None
        table = evaluate_candidates(scorer, tensors.whole, starters, 0, advance)
        labels = [c.label for c in starters]
        index, merit = choose(table, labels)
        report.base_model = labels[index]
        report.base_scores = as_json(table[labels[index]])
        report.base_selection = None if config.base_model else OlmSelection(
            {label: as_json(table[label]) for label in labels},
            dict(zip(labels, merit, strict=True)),
        )  # fmt: skip
        holds = starters[-1].label
        save()
    base = by_label[report.base_model]
    if holds != base.label and working:
        working.load(tensors.whole(base))

    depth = sources[base.terms[0][0]].num_layers
    order = positions(config, depth)
    winners: dict[Position, str] = dict.fromkeys(order, base.label)
    current = [scores_from_json(report.base_scores or {})[n] for n in names]
    for decided in report.layers:  # resume: re-apply what earlier runs decided
        position = (decided.layer, decided.part)
        winners[position] = decided.best_model
        if decided.best_model != base.label and working:
            working.load(tensors.at(by_label[decided.best_model], position))
        current = [scores_from_json(decided.scores[decided.best_model])[n] for n in names]

    done = {(decided.layer, decided.part) for decided in report.layers}
    remaining = [p for p in order if p not in done]
    advance = (
        progress("OLM positions x candidates", len(remaining) * (len(at_positions) - 1))
        if progress
        else None
    )
    for position in remaining:
        began = time.perf_counter()
        layer, part = position
        if working:
            working.cache_prefix(layer)
        holder = winners[position]
        challengers = [c for c in at_positions if c.label != holder]
        table = {holder: current}
        layout = Layout(base.label, tuple((p, w) for p, w in winners.items() if w != base.label))
        table |= evaluate_candidates(
            scorer,
            functools.partial(tensors.at, position=position),
            challengers,
            layer,
            advance,
            at=(layout, position),
        )
        labels = [holder, *(c.label for c in challengers)]
        index, merit = choose(table, labels)
        winner, verdict = _accept(config, labels[index], holder, table)
        if winner != labels[-1] and working:
            working.load(tensors.at(by_label[winner], position))
        winners[position] = winner
        current = table[winner]
        report.layers.append(
            OlmPosition(
                layer=layer,
                part=part,
                candidates=labels,
                current=holder,
                scores={m: as_json(table[m]) for m in labels},
                metrics={n: {m: table[m][i].value for m in labels} for i, n in enumerate(names)},
                merit=dict(zip(labels, merit, strict=True)),
                proposed=labels[index],
                acceptance=verdict,
                best_model=winner,
                seconds=round(time.perf_counter() - began, 4),
            )
        )
        save()
        if log:
            pairs = zip(names, current, strict=True)
            summary = ", ".join(f"{Path(n).stem} {s.value:.4g}" for n, s in pairs)
            where = f"layer {layer}" + (f" {part}" if part else "")
            log(f"{where}: {winner} ({summary})")
    report.complete = True
    report.evaluation = vars(scorer.counters)
    if workers:
        workers.close()
    save()
    return SearchResult(base.label, winners, by_label, report, working)


def _accept(
    config: OlmConfig, proposed: str, holder: str, table: dict[str, list[Score]]
) -> tuple[str, dict[str, Any] | None]:
    """The proposed candidate if it passes `config.acceptance` against the holder, else the
    holder; and the test's record (None when nothing was tested)."""
    rule = config.acceptance
    if proposed == holder or (rule.test == "none" and rule.min_gain == 0):
        return proposed, None
    paired = sign_test(table[proposed], table[holder])
    accepted = paired.better - paired.worse >= rule.min_gain and (
        rule.test == "none" or paired.p_value <= rule.alpha
    )
    verdict = {
        "better": paired.better,
        "worse": paired.worse,
        "p_value": paired.p_value,
        "accepted": accepted,
    }
    return (proposed if accepted else holder), verdict
