"""mergekit's `linear` read as per-tensor selections and blends (`recipe.selection_recipe`
writes plans in that form).

mergekit's linear merge computes sum(w_i * t_i) / sum(w_i) per tensor in float32 and casts the
result back. With one source weighted 1 and the others 0 that is the selected tensor exactly,
so a `linear` config with 0/1 `weight` filters is how a plan that takes single modules from
other models (NER's `granularity: module`) travels as a recipe: mergekit and hubmerge build the
same model from it. With `normalize: false` there is no division, and any weights are a blend
that hubmerge computes in the same float32 steps (`tensorfile.weighted_sum`): that is how OLM's
mean and task-arithmetic layers travel. A weighted average with `normalize: true` is refused
(its division is mergekit's to round).

Parameters follow mergekit: `weight` is looked up on the source, then the slice, then the top
level, against the *source* tensor name; the embeddings and the head are merged from the first
and the last slice's sources at t = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hubmerge import arch
from hubmerge.config import LinearConfig, LinearSlice, LinearSource
from hubmerge.errors import ConfigError
from hubmerge.methods.base import Method
from hubmerge.methods.passthrough import resolve
from hubmerge.plan import (
    EdgeBlend,
    EdgePlan,
    LayerBlend,
    LayerPlan,
    MergePlan,
    edge_tensors,
)
from hubmerge.sources import ModelSource


def plan(config: LinearConfig, sources: Mapping[str, ModelSource]) -> MergePlan:
    layers: list[LayerPlan] = []
    for i, out_slice in enumerate(config.slices):
        for j, source in enumerate(out_slice.sources):
            start, end = source.layer_range
            if end > sources[source.model].num_layers:
                raise ConfigError(
                    f"slices[{i}].sources[{j}].layer_range: [{start}, {end}] is out of bounds "
                    f"for {source.model} ({sources[source.model].num_layers} layers)"
                )
        first = out_slice.sources[0]
        count = first.layer_range[1] - first.layer_range[0]
        for k in range(count):
            t = k / (count - 1) if count > 1 else 1.0
            choices: dict[str, tuple[str, int]] = {}
            blends: dict[str, LayerBlend] = {}
            for suffix in sources[first.model].layers[first.layer_range[0] + k]:
                names = [arch.layer_name(s.layer_range[0] + k, suffix) for s in out_slice.sources]
                terms = _terms(
                    config, out_slice, out_slice.sources, names, t, sources, f"slices[{i}]"
                )
                picked = [(m, s.layer_range[0] + k, w) for m, w, s in terms]
                if len(picked) == 1:
                    choices[suffix] = picked[0][:2]
                else:
                    blends[suffix] = tuple(picked)
            layers.append(LayerPlan.from_choices(choices, blends))

    # mergekit pairs the last slice's models with as many inputs as the first slice has.
    last = config.slices[-1].sources[: len(config.slices[0].sources)]
    embed = _edge(config, config.slices[0], config.slices[0].sources, sources, pre=True)
    head = _edge(config, config.slices[-1], last, sources, pre=False)
    donor = config.base_model or config.slices[0].sources[0].model
    tokenizer = config.tokenizer_source or donor
    used = {layer.model for layer in layers} | {embed.model, head.model}
    used |= {model for layer in layers for model, _ in layer.overrides.values()}
    used |= {m for layer in layers for terms in layer.blends.values() for m, _, _ in terms}
    used |= {m for edge in (embed, head) for terms in edge.blends.values() for m, _ in terms}
    return MergePlan(
        method="linear",
        layers=layers,
        embed=embed,
        head=head,
        donor=donor,
        tokenizer=donor if tokenizer == "base" else tokenizer,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=[m for m in config.referenced_models() if m in used or m == donor],
    )


METHOD = Method("linear", LinearConfig, preview=plan)


def _edge(
    config: LinearConfig,
    out_slice: LinearSlice,
    inputs: Sequence[LinearSource],
    sources: Mapping[str, ModelSource],
    *,
    pre: bool,
) -> EdgePlan:
    """Where the embeddings (`pre`) or the head come from: one model, or per-tensor blends."""
    where = f"slices[{0 if pre else len(config.slices) - 1}]"
    chosen: set[str] = set()
    blends: dict[str, EdgeBlend] = {}
    for name in edge_tensors(sources[inputs[0].model], pre=pre):
        terms = _terms(config, out_slice, inputs, [name] * len(inputs), 0.0, sources, where)
        if len(terms) == 1:
            chosen.add(terms[0][0])
        else:
            blends[name] = tuple((m, w) for m, w, _ in terms)
    if len(chosen) > 1 or (chosen and blends):
        part = "embeddings" if pre else "final norm and lm_head"
        raise ConfigError(
            f"{where}: the {part} come from several models ({', '.join(sorted(chosen))}); "
            "hubmerge takes them from one, or blends them all"
        )
    return EdgePlan(chosen.pop() if chosen else inputs[0].model, blends=blends)


def _terms(
    config: LinearConfig,
    out_slice: LinearSlice,
    inputs: Sequence[LinearSource],
    names: Sequence[str],
    t: float,
    sources: Mapping[str, ModelSource],
    where: str,
) -> list[tuple[str, float, LinearSource]]:
    """What one tensor (`names`, one per input) is: (model, weight, input) terms.

    A selection (one input weighted 1, every other 0) is one term; with `normalize: false`
    any other weights are a blend of every input, zeros included (mergekit adds 0 x t too).
    """
    weights: list[float] = []
    for source, name in zip(inputs, names, strict=True):
        levels = [source.parameters, out_slice.parameters, config.parameters]
        weight = resolve([p.weight if p else None for p in levels], name, t)
        if weight is None:
            raise ConfigError(f"{where}: no weight for {name} of {source.model}")
        weights.append(weight)
    picked = [i for i, w in enumerate(weights) if w != 0.0]
    if len(picked) != 1 or weights[picked[0]] != 1.0:
        normalize = config.parameters.normalize if config.parameters else None
        if normalize is False:
            for source, name in zip(inputs, names, strict=True):
                if name not in sources[source.model].tensors:
                    raise ConfigError(f"{where}: {source.model} has no tensor {name}")
            return [(s.model, w, s) for s, w in zip(inputs, weights, strict=True)]
        values = ", ".join(f"{s.model}: {w:g}" for s, w in zip(inputs, weights, strict=True))
        raise ConfigError(
            f"{where}: {names[0]} has weights {values}; hubmerge reads weighted linear merges "
            "only with `parameters: {normalize: false}` (else one source weighted 1, others 0)"
        )
    chosen, name = inputs[picked[0]], names[picked[0]]
    tensors = sources[chosen.model].tensors
    if name not in tensors:
        raise ConfigError(f"{where}: {chosen.model} has no tensor {name}")
    first = sources[inputs[0].model].tensors.get(names[0])
    if config.dtype is None and first is not None and tensors[name].dtype != first.dtype:
        # mergekit casts the result to the first source's dtype; hubmerge copies the selected
        # tensor as stored. Refuse rather than build something mergekit would not.
        raise ConfigError(
            f"{where}: {name} of {chosen.model} is stored as {tensors[name].dtype}, "
            f"{inputs[0].model}'s as {first.dtype}: set dtype"
        )
    return [(chosen.model, 1.0, chosen)]
