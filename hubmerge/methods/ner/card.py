"""NER's part of the model card: the scores table and the heatmap, from the folder's `NerReport`.

Nothing here imports torch; matplotlib is imported only to draw the heatmap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hubmerge.errors import CardError
from hubmerge.folder import NER_HEATMAP_FILE, NER_REPORT_FILE, NerReport, read_report
from hubmerge.methods.base import CardInputs


def card_section(inputs: CardInputs) -> dict[str, Any] | None:
    """NER's per-layer scores (each model's mean NER over the layer's matrices) and heatmap;
    None when the folder has no NER report."""
    report = read_report(inputs.folder, NerReport)
    if report is None:
        return None
    names = inputs.names
    try:
        rows: list[dict[str, Any]] = [
            {
                "layer": record.layer,
                "chosen": names.model(record.chosen),
                "scores": [(record.scores[m].mean, m == record.chosen) for m in report.models],
            }
            for record in report.layers
        ]
    except KeyError as e:  # a layer without a model's scores
        raise CardError(f"{NER_REPORT_FILE}: not a NER report hubmerge can read ({e!r})") from None
    heatmap = (inputs.folder / NER_HEATMAP_FILE).is_file()
    return {
        "granularity": report.granularity,
        "normalize": report.normalize,
        "models": [names.model(m) for m in report.models],
        "rows": rows,
        "digits": _distinguishing_digits([[s for s, _ in row["scores"]] for row in rows]),
        "heatmap": NER_HEATMAP_FILE if heatmap else None,
    }


def draw_heatmap(folder: Path) -> None:
    """Draw `ner_heatmap.png` into `folder` from its NER report, unless it has one already:
    re-rendering a card (`hubmerge card`, `card --all`) keeps a committed picture byte for byte."""
    path = Path(folder) / NER_HEATMAP_FILE
    report = read_report(folder, NerReport) if not path.exists() else None
    if report is not None:
        heatmap_png(report, path)


def _distinguishing_digits(rows: Sequence[Sequence[float]], least: int = 5, most: int = 12) -> int:
    """Decimals enough that scores which differ in a row also read differently (at least
    `least`, at most `most`): NER margins between candidates can be 1e-7, and a bold winner
    that prints the same as the loser hides the decision.
    """
    for digits in range(least, most):
        if all(len({f"{x:.{digits}f}" for x in row}) == len(set(row)) for row in rows):
            return digits
    return most


def heatmap_png(report: NerReport, path: Path) -> None:
    """Layers x models, coloured by each layer score's distance from the layer's mean (the
    scores of one layer differ in the 3rd or 4th digit, far less than from layer to layer).
    The best-scoring model of each layer is framed; in module granularity each cell also
    counts the matrices taken from that model."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    models = report.models
    records = report.layers
    module = report.granularity == "module"
    means = np.array([[r.scores[m].mean for m in models] for r in records])
    delta = means - means.mean(axis=1, keepdims=True)
    bound = float(np.abs(delta).max()) or 1.0
    fig = Figure(figsize=(2.6 + 1.3 * len(models), 1.8 + 0.32 * len(records)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, label="NER minus the layer's mean")
    ax.set_xticks(range(len(models)), [Path(m).name or m for m in models], rotation=30, ha="right")
    ax.set_yticks(range(len(records)), [str(r.layer) for r in records])
    ax.set_xlabel("model")
    ax.set_ylabel("layer")
    ax.set_title(
        "Mean NER per layer; framed: the best"
        + ("\n(n): matrices taken from the model" if module else "")
    )
    for row, record in enumerate(records):
        for col, model in enumerate(models):
            text = f"{means[row, col]:.4f}"
            if module and record.modules is not None:
                matrices = record.scores[model].matrices
                text += f" ({sum(record.modules[s] == model for s in matrices)})"
            dark = abs(delta[row, col]) > 0.6 * bound  # the deep colours need white text
            ax.text(
                col,
                row,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
            if record.chosen == model:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, linewidth=2))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
