"""NER layer selection (seed 002): take each layer from the model whose weights have the highest
Normalized Effective Rank (see `scores.py` for the score and how it is computed).

`granularity: layer` scores a layer by the mean NER of its 2-D weight matrices and takes the
whole layer from the best model. `granularity: module` chooses every 2-D weight on its own (its
bias follows it), as the public implementation does; a layer's other tensors (norms) come from
the model with the best layer score. Ties (scores within 1e-10) go to the base model, then
to candidate order, so a run is deterministic. Embeddings, final norm and `lm_head` come from
the base unless `embeddings: ner`, which chooses them by NER too but never splits tied
embeddings.

The choice compiles to a plan like every other method's, with a `NerReport` (every score, every
choice, the recipe) that the merge writes beside the model; the card draws its heatmap from it
(`card.py`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from hubmerge import arch
from hubmerge.config import NerConfig
from hubmerge.devices import check_device
from hubmerge.errors import ConfigError, SourceError
from hubmerge.folder import NerEdge, NerLayer, NerModelScores, NerReport
from hubmerge.methods.base import Context, Method, Planned
from hubmerge.methods.ner.card import card_section, draw_heatmap
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan, edge_tensors
from hubmerge.recipe import plan_recipe
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import DTYPE_CODES, TensorInfo

#: Scores closer than this are equal. Real differences between models are around 1e-4; this
#: absorbs the last-bit noise of identical weights scored on another device or machine.
TIE = 1e-10


def plan(config: NerConfig, sources: Mapping[str, ModelSource], context: Context) -> Planned:
    """Score every matrix, choose, and plan; the report holds the scores and the recipe."""
    from hubmerge.methods.ner import scores as ner  # imports torch: only when a NER merge runs

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
    recipe = plan_recipe(result, sources)
    report = NerReport(
        granularity=config.granularity,
        normalize=config.normalize,
        base_model=config.base_model,
        models=pool,
        layers=records,
        embed=edges["embed"],
        head=edges["head"],
        recipe=recipe,
    )
    return Planned(result, (report,), recipe)


Matrices = dict[str, TensorInfo]


def _choose_layers(
    config: NerConfig,
    pool: list[str],
    sources: Mapping[str, ModelSource],
    matrices: Mapping[str, list[Matrices]],
    scores: Mapping[TensorInfo, float],
) -> tuple[list[LayerPlan], list[NerLayer]]:
    """Each output layer's plan, and its report record (every score, every choice)."""
    layers: list[LayerPlan] = []
    records: list[NerLayer] = []
    for index, tensors in enumerate(sources[config.base_model].layers):
        matrix_scores = {
            suffix: {ref: scores[matrices[ref][index][suffix]] for ref in pool}
            for suffix in matrices[config.base_model][index]
        }
        means = {ref: statistics.fmean(s[ref] for s in matrix_scores.values()) for ref in pool}
        winner = _best(means)
        modules: dict[str, str] | None = None
        if config.granularity == "layer":
            layers.append(LayerPlan(winner, index))
        else:
            best = {s: _best(v) for s, v in matrix_scores.items()}
            # A bias goes with its weight; norms (no matrix) with the best layer.
            modules = {s: best.get(s, best.get(_weight_of(s), winner)) for s in tensors}
            layers.append(LayerPlan.from_choices({s: (m, index) for s, m in modules.items()}))
        layer_scores = {
            ref: NerModelScores(means[ref], {s: v[ref] for s, v in matrix_scores.items()})
            for ref in pool
        }
        records.append(NerLayer(index, winner, layer_scores, modules))
    return layers, records


def _choose_edges(
    config: NerConfig,
    pool: list[str],
    matrices: Mapping[str, Mapping[bool, Matrices]],
    scores: Mapping[TensorInfo, float],
) -> tuple[str, str, dict[str, NerEdge]]:
    """The embeddings' and the head's models, and their report records."""
    if config.embeddings == "base":
        chosen = NerEdge(config.base_model)
        return config.base_model, config.base_model, {"embed": chosen, "head": chosen}
    edges: dict[str, NerEdge] = {}
    for name, pre in (("embed", True), ("head", False)):
        if matrices[config.base_model][pre]:
            edge_scores = {
                ref: statistics.fmean(scores[i] for i in matrices[ref][pre].values())
                for ref in pool
            }
            edges[name] = NerEdge(_best(edge_scores), edge_scores)
    # Tied embeddings have no `lm_head`: the head (final norm) stays with the embeddings.
    edges.setdefault("head", NerEdge(edges["embed"].chosen, tied=True))
    return edges["embed"].chosen, edges["head"].chosen, edges


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
    dtype = arch.config_dtype(base.config)
    if dtype not in DTYPE_CODES:
        raise ConfigError(
            "dtype: the models store their weights in different dtypes and the base model's "
            "config.json names none: set dtype"
        )
    return dtype


METHOD = Method(
    "ner", NerConfig, planner=plan, card_key="ner", card=card_section, images=draw_heatmap
)
