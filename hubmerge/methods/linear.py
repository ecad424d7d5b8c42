"""mergekit's `linear` read as a per-tensor selection, and plans written in that form.

mergekit's linear merge computes sum(w_i * t_i) / sum(w_i) per tensor in float32 and casts the
result back. With one source weighted 1 and the others 0 that is the selected tensor exactly,
so a `linear` config with 0/1 `weight` filters is how a plan that takes single modules from
other models (NER's `granularity: module`) travels as a recipe: mergekit and hubmerge build the
same model from it. hubmerge reads only that form and refuses a real weighted average, which
is another method.

Parameters follow mergekit: `weight` is looked up on the source, then the slice, then the top
level, against the *source* tensor name; the embeddings and the head are merged from the first
and the last slice's sources at t = 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from hubmerge import arch
from hubmerge.config import LinearConfig, LinearSlice, LinearSource
from hubmerge.errors import ConfigError
from hubmerge.methods.passthrough import resolve
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan, edge_tensors, filter_rules
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
            for suffix in sources[first.model].layers[first.layer_range[0] + k]:
                names = [arch.layer_name(s.layer_range[0] + k, suffix) for s in out_slice.sources]
                chosen = _select(
                    config, out_slice, out_slice.sources, names, t, sources, f"slices[{i}]"
                )
                choices[suffix] = (chosen.model, chosen.layer_range[0] + k)
            layers.append(LayerPlan.from_choices(choices))

    # mergekit pairs the last slice's models with as many inputs as the first slice has.
    last = config.slices[-1].sources[: len(config.slices[0].sources)]
    embed = _edge(config, config.slices[0], config.slices[0].sources, sources, pre=True)
    head = _edge(config, config.slices[-1], last, sources, pre=False)
    donor = config.base_model or config.slices[0].sources[0].model
    tokenizer = config.tokenizer_source or donor
    used = {layer.model for layer in layers} | {embed, head}
    used |= {model for layer in layers for model, _ in layer.overrides.values()}
    return MergePlan(
        method="linear",
        layers=layers,
        embed=EdgePlan(embed),
        head=EdgePlan(head),
        donor=donor,
        tokenizer=donor if tokenizer == "base" else tokenizer,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=[m for m in config.referenced_models() if m in used or m == donor],
    )


def _edge(
    config: LinearConfig,
    out_slice: LinearSlice,
    inputs: Sequence[LinearSource],
    sources: Mapping[str, ModelSource],
    *,
    pre: bool,
) -> str:
    """The one model the embeddings (`pre`) or the head come from."""
    where = f"slices[{0 if pre else len(config.slices) - 1}]"
    chosen = {
        _select(config, out_slice, inputs, [name] * len(inputs), 0.0, sources, where).model
        for name in edge_tensors(sources[inputs[0].model], pre=pre)
    }
    if len(chosen) > 1:
        part = "embeddings" if pre else "final norm and lm_head"
        raise ConfigError(
            f"{where}: the {part} come from several models ({', '.join(sorted(chosen))}); "
            "hubmerge takes them from one"
        )
    return chosen.pop()


def _select(
    config: LinearConfig,
    out_slice: LinearSlice,
    inputs: Sequence[LinearSource],
    names: Sequence[str],
    t: float,
    sources: Mapping[str, ModelSource],
    where: str,
) -> LinearSource:
    """The input weighted 1 for its tensor (`names`, one per input), all others weighted 0."""
    weights: list[float] = []
    for source, name in zip(inputs, names, strict=True):
        levels = [source.parameters, out_slice.parameters, config.parameters]
        weight = resolve([p.weight if p else None for p in levels], name, t)
        if weight is None:
            raise ConfigError(f"{where}: no weight for {name} of {source.model}")
        weights.append(weight)
    picked = [i for i, w in enumerate(weights) if w != 0.0]
    if len(picked) != 1 or weights[picked[0]] != 1.0:
        values = ", ".join(f"{s.model}: {w:g}" for s, w in zip(inputs, weights, strict=True))
        raise ConfigError(
            f"{where}: {names[0]} has weights {values}; hubmerge reads linear merges only as "
            "selections (one source weighted 1, every other 0)"
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
    return chosen


def selection_recipe(plan: MergePlan, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    """The mergekit `linear` config, with 0/1 weight filters, that rebuilds `plan` exactly.

    Consecutive output layers that take each tensor from the same model become one slice;
    each slice lists the models it takes something from, the first slice the embeddings'
    donor too and the last slice the head's (listed first there, as mergekit merges the head
    from only as many of the last slice's models as the first slice has). A source's rules
    name the tensors it gives (weight 1) or does not (weight 0), whichever are fewer.
    """
    if plan.embed.scales or plan.head.scales or any(layer.scales for layer in plan.layers):
        raise ValueError("a plan with both scales and overrides has no mergekit form")
    groups: list[tuple[dict[str, str], dict[str, int], int]] = []
    for layer in plan.layers:
        suffixes = sources[layer.model].layers[layer.layer]
        choice = {s: layer.overrides.get(s, (layer.model, layer.layer)) for s in suffixes}
        starts: dict[str, int] = {}
        for model, index in choice.values():
            if starts.setdefault(model, index) != index:
                raise ValueError(f"output layer takes two layers of {model}: no mergekit form")
        models = {s: model for s, (model, _) in choice.items()}
        last = groups[-1] if groups else None
        if last and last[0] == models and all(starts[m] == last[1][m] + last[2] for m in starts):
            groups[-1] = (last[0], last[1], last[2] + 1)
        else:
            groups.append((models, starts, 1))

    slices = []
    for g, (models, starts, count) in enumerate(groups):
        owner = Counter(models.values()).most_common(1)[0][0]
        order = [m for m in dict.fromkeys([*plan.models, *starts]) if m in starts]
        if g == 0 and plan.embed.model not in order:
            order.append(plan.embed.model)
        if g == len(groups) - 1:
            order = [plan.head.model] + [m for m in order if m != plan.head.model]
        entries = []
        for model in order:
            start = starts.get(model, starts[owner])
            if start + count > sources[model].num_layers:
                raise ValueError(f"{model} has no layers {start}..{start + count - 1}")
            owned = {
                arch.layer_name(start + k, suffix): float(chosen == model)
                for k in range(count)
                for suffix, chosen in models.items()
            }
            if g == 0:
                owned |= _edge_weights(sources[model], model == plan.embed.model, pre=True)
            if g == len(groups) - 1:
                owned |= _edge_weights(sources[model], model == plan.head.model, pre=False)
            default = Counter(owned.values()).most_common(1)[0][0]
            entries.append(
                {
                    "model": model,
                    "layer_range": [start, start + count],
                    "parameters": {"weight": filter_rules(owned, default) or [{"value": default}]},
                }
            )
        slices.append({"sources": entries})
    return plan.recipe_with("linear", slices)


def _edge_weights(source: ModelSource, donor: bool, *, pre: bool) -> dict[str, float]:
    return dict.fromkeys(edge_tensors(source, pre=pre), float(donor))
