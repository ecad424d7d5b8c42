"""OLM's section of the model card: the search as tables, from the folder's `OlmReport`."""

from __future__ import annotations

from typing import Any

from hubmerge.errors import CardError
from hubmerge.folder import OLM_REPORT_FILE, DatasetScores, OlmHeldout, OlmReport, read_report
from hubmerge.methods.base import CardInputs


def card_section(inputs: CardInputs) -> dict[str, Any] | None:
    """Base selection and each position's candidates (lower is better); None without a report."""
    report = read_report(inputs.folder, OlmReport)
    if report is None:
        return None
    names = inputs.names
    datasets = list(report.datasets)

    def rows(
        scores: dict[str, DatasetScores], merit: dict[str, float], chosen: str | None
    ) -> list[dict[str, Any]]:
        return [
            {
                "model": names.model(model),
                "scores": [scores[model][d]["score"] for d in datasets],
                "merit": merit.get(model),
                "chosen": model == chosen,
            }
            for model in scores
        ]

    if report.base_model is None:
        raise CardError(f"{OLM_REPORT_FILE}: not an OLM report hubmerge can read (no base model)")
    selection = report.base_selection
    try:
        return {
            "direction": report.direction,
            "aggregate": report.aggregate,
            "datasets": [(names.path(d), report.datasets[d]) for d in datasets],
            "base": names.model(report.base_model),
            "base_rows": rows(selection.scores, selection.merit, report.base_model)
            if selection
            else [],
            "positions": [
                {
                    "layer": f"{position.layer} {position.part}"
                    if position.part
                    else position.layer,
                    "winner": names.model(position.best_model),
                    "rows": rows(position.scores, position.merit, position.best_model),
                }
                for position in sorted(report.layers, key=lambda p: p.layer)
            ],
            "heldout": _heldout(report.heldout, inputs),
        }
    except (KeyError, TypeError) as e:  # a score record of another shape
        raise CardError(f"{OLM_REPORT_FILE}: not an OLM report hubmerge can read ({e!r})") from None


def _heldout(heldout: OlmHeldout | None, inputs: CardInputs) -> dict[str, Any] | None:
    """The held-out comparison `hubmerge demo` records: accuracy per model and task."""
    if not heldout:
        return None
    names = inputs.names
    tasks = list(heldout.datasets)
    return {
        "metric": heldout.metric,
        "tasks": tasks,
        "rows": [
            {
                "model": names.model(label),
                "scores": [scores[t] for t in tasks],
                "composite": sum(scores[t] for t in tasks) / len(tasks),
                "chosen": label == heldout.merged,
            }
            for label, scores in heldout.accuracy.items()
        ],
        "best_donor": names.model(heldout.best_donor),
        "margin": 100 * heldout.margin,
    }
