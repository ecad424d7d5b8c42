"""NER layer selection (seed 002): take each layer from the model whose weights have the highest
Normalized Effective Rank (see `hubmerge.ner` for the score and how it is computed).

`granularity: layer` scores a layer by the mean NER of its 2-D weight matrices and takes the
whole layer from the best model. `granularity: module` chooses every 2-D weight on its own (its
bias follows it), as the public implementation does; a layer's other tensors (norms) come from
the model with the best layer score. Ties (scores within 1e-10) go to the base model, then
to candidate order, so a run is deterministic. Embeddings, final norm and `lm_head` come from
the base unless `embeddings: ner`, which chooses them by NER too but never splits tied
embeddings.

The choice compiles to a plan like every other method's. Alongside the model it writes
`ner_report.json` (every score, every choice, the recipe) and `ner_heatmap.png` for the card.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmerge.config import NerConfig
from hubmerge.devices import check_device
from hubmerge.errors import ConfigError, SourceError
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan, edge_tensors
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import DTYPE_CODES, TensorInfo

if TYPE_CHECKING:
    from hubmerge.merge import MergeContext

REPORT_FILE = "ner_report.json"
HEATMAP_FILE = "ner_heatmap.png"
#: Scores closer than this are equal. Real differences between models are around 1e-4; this
#: absorbs the last-bit noise of identical weights scored on another device or machine.
TIE = 1e-10


def plan(config: NerConfig, sources: Mapping[str, ModelSource], context: MergeContext) -> MergePlan:
    from hubmerge import ner  # imports torch: only when a NER merge runs

    pool = config.referenced_models()
    _check_pool(config, pool, sources)
    device = check_device(context.device or "cpu", allow_auto=False)
    dtype = config.dtype or _common_dtype(config, pool, sources)

    layer_matrices = {ref: [_matrices(layer) for layer in sources[ref].layers] for ref in pool}
    edge_matrices = {
        ref: {pre: _matrices(edge_tensors(sources[ref], pre=pre)) for pre in (True, False)}
        for ref in pool
    }
    wanted = [info for ref in pool for layer in layer_matrices[ref] for info in layer.values()]
    if config.embeddings == "ner":
        wanted += [i for ref in pool for edge in edge_matrices[ref].values() for i in edge.values()]
    reporter = context.reporter
    scores = ner.score_tensors(
        wanted,
        normalize=config.normalize,
        device=device,
        cache=ner.cache_dir(),
        progress=reporter.progress if reporter else None,
    )

    layers, records = _choose_layers(config, pool, sources, layer_matrices, scores)
    embed, head, edges = _choose_edges(config, pool, edge_matrices, scores)
    used = {layer.model for layer in layers} | {embed, head}
    used |= {model for layer in layers for model, _ in layer.overrides.values()}
    result = MergePlan(
        method="ner",
        layers=layers,
        embed=EdgePlan(embed),
        head=EdgePlan(head),
        donor=config.base_model,
        tokenizer=config.base_model,
        dtype=dtype,
        out_dtype=config.out_dtype,
        models=[ref for ref in pool if ref in used or ref == config.base_model],
    )
    if context.staging is not None:
        report = {
            "method": "ner",
            "granularity": config.granularity,
            "normalize": config.normalize,
            "base_model": config.base_model,
            "models": pool,
            "layers": records,
            "embed": edges["embed"],
            "head": edges["head"],
            "recipe": result.to_recipe(sources),
        }
        (context.staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        write_heatmap(report, context.staging / HEATMAP_FILE)
    return result


Matrices = dict[str, TensorInfo]


def _choose_layers(
    config: NerConfig,
    pool: list[str],
    sources: Mapping[str, ModelSource],
    matrices: Mapping[str, list[Matrices]],
    scores: Mapping[TensorInfo, float],
) -> tuple[list[LayerPlan], list[dict[str, Any]]]:
    """Each output layer's plan, and its report record (every score, every choice)."""
    layers: list[LayerPlan] = []
    records: list[dict[str, Any]] = []
    for index, tensors in enumerate(sources[config.base_model].layers):
        matrix_scores = {
            suffix: {ref: scores[matrices[ref][index][suffix]] for ref in pool}
            for suffix in matrices[config.base_model][index]
        }
        means = {ref: statistics.fmean(s[ref] for s in matrix_scores.values()) for ref in pool}
        winner = _best(means)
        record: dict[str, Any] = {
            "layer": index,
            "chosen": winner,
            "scores": {
                ref: {"mean": means[ref], "matrices": {s: v[ref] for s, v in matrix_scores.items()}}
                for ref in pool
            },
        }
        if config.granularity == "layer":
            layers.append(LayerPlan(winner, index))
        else:
            best = {s: _best(v) for s, v in matrix_scores.items()}
            # A bias goes with its weight; norms (no matrix) with the best layer.
            modules = {s: best.get(s, best.get(_weight_of(s), winner)) for s in tensors}
            record["modules"] = modules
            layers.append(LayerPlan.from_choices({s: (m, index) for s, m in modules.items()}))
        records.append(record)
    return layers, records


def _choose_edges(
    config: NerConfig,
    pool: list[str],
    matrices: Mapping[str, Mapping[bool, Matrices]],
    scores: Mapping[TensorInfo, float],
) -> tuple[str, str, dict[str, Any]]:
    """The embeddings' and the head's models, and their report records."""
    if config.embeddings == "base":
        chosen = {"chosen": config.base_model}
        return config.base_model, config.base_model, {"embed": chosen, "head": chosen}
    edges: dict[str, Any] = {}
    for name, pre in (("embed", True), ("head", False)):
        if matrices[config.base_model][pre]:
            edge_scores = {
                ref: statistics.fmean(scores[i] for i in matrices[ref][pre].values())
                for ref in pool
            }
            edges[name] = {"chosen": _best(edge_scores), "scores": edge_scores}
    # Tied embeddings have no `lm_head`: the head (final norm) stays with the embeddings.
    edges.setdefault("head", {"chosen": edges["embed"]["chosen"], "tied": True})
    return edges["embed"]["chosen"], edges["head"]["chosen"], edges


def _matrices(tensors: Mapping[str, TensorInfo]) -> Matrices:
    """The tensors NER scores: the 2-D weights (norms and biases have no spectrum)."""
    return {name: info for name, info in tensors.items() if len(info.shape) == 2}


def _weight_of(suffix: str) -> str:
    """`self_attn.q_proj.bias` -> `self_attn.q_proj.weight` (other names map to themselves)."""
    stem, dot, leaf = suffix.rpartition(".")
    return f"{stem}{dot}weight" if leaf == "bias" else suffix


def _best(scores: Mapping[str, float]) -> str:
    """The highest score; of scores within `TIE` of it, the first: the base, then candidates
    in config order."""
    top = max(scores.values())
    return next(model for model, score in scores.items() if score >= top - TIE)


def _check_pool(config: NerConfig, pool: list[str], sources: Mapping[str, ModelSource]) -> None:
    """Every candidate must offer the base's tensors, shape for shape, at every position."""
    base = sources[config.base_model]
    for ref in pool[1:]:
        source = sources[ref]
        if source.num_layers != base.num_layers:
            raise SourceError(
                f"{ref}: {source.num_layers} layers, the base model {base.ref} has "
                f"{base.num_layers}"
            )
        places = [
            (f"layer {i}: ", tensors, source.layers[i]) for i, tensors in enumerate(base.layers)
        ]
        if config.embeddings == "ner":
            places.append(("", base.non_layer, source.non_layer))
        for where, expected, found in places:
            for name in expected.keys() | found.keys():
                if name not in found:
                    raise SourceError(f"{ref}: {where}tensor {name} is missing (the base has it)")
                if name not in expected:
                    raise SourceError(f"{ref}: {where}tensor {name} is not in the base model")
                if found[name].shape != expected[name].shape:
                    raise SourceError(
                        f"{ref}: {where}tensor {name} has shape {list(found[name].shape)}, "
                        f"the base model's is {list(expected[name].shape)}"
                    )


def _common_dtype(
    config: NerConfig, pool: list[str], sources: Mapping[str, ModelSource]
) -> str | None:
    """None when every tensor is stored alike in every model; else the base model's dtype.

    Layers taken from a float32 fine-tune and a bfloat16 base would give a file of mixed
    dtypes that its config.json (the base's) misdescribes, and no mergekit recipe for it.
    """
    base = sources[config.base_model]
    if all(
        sources[ref].tensors[name].dtype == info.dtype
        for ref in pool[1:]
        for name, info in base.tensors.items()
        if name in sources[ref].tensors
    ):
        return None
    dtype = base.config.get("dtype") or base.config.get("torch_dtype")
    if dtype not in DTYPE_CODES:
        raise ConfigError(
            "dtype: the models store their weights in different dtypes and the base model's "
            "config.json names none: set dtype"
        )
    return dtype


def write_heatmap(report: Mapping[str, Any], path: Path) -> None:
    """Layers x models, coloured by each layer score's distance from the layer's mean (the
    scores of one layer differ in the 3rd or 4th digit, far less than from layer to layer).
    The best-scoring model of each layer is framed; in module granularity each cell also
    counts the matrices taken from that model."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    models: list[str] = report["models"]
    records = report["layers"]
    module = report["granularity"] == "module"
    means = np.array([[r["scores"][m]["mean"] for m in models] for r in records])
    delta = means - means.mean(axis=1, keepdims=True)
    bound = float(np.abs(delta).max()) or 1.0
    fig = Figure(figsize=(2.6 + 1.3 * len(models), 1.8 + 0.32 * len(records)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, label="NER minus the layer's mean")
    ax.set_xticks(range(len(models)), [Path(m).name or m for m in models], rotation=30, ha="right")
    ax.set_yticks(range(len(records)), [str(r["layer"]) for r in records])
    ax.set_xlabel("model")
    ax.set_ylabel("layer")
    ax.set_title(
        "Mean NER per layer; framed: the best"
        + ("\n(n): matrices taken from the model" if module else "")
    )
    for row, record in enumerate(records):
        for col, model in enumerate(models):
            text = f"{means[row, col]:.4f}"
            if module:
                matrices = record["scores"][model]["matrices"]
                text += f" ({sum(record['modules'][s] == model for s in matrices)})"
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
            if record["chosen"] == model:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, linewidth=2))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
