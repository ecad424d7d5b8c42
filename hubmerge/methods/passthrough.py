"""mergekit's passthrough: stack layer ranges, with mergekit's full `scale` semantics.

A scale is looked up on the source, then the slice, then the top level; the first level whose
setting yields a value wins. A setting is a number, a gradient (a list of numbers interpolated
over the slice's layers at t = i / (n - 1), t = 1 for a one-layer slice), or `{filter, value}`
rules where the first rule whose filter is a substring of the *source* tensor name wins.
Embeddings take the first slice's parameters at t = 0, the head the last slice's at t = 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from typing_extensions import TypeIs

from hubmerge import arch
from hubmerge.config import Gradient, Parameters, PassthroughConfig, ScaleRule, ScaleSetting
from hubmerge.errors import ConfigError
from hubmerge.methods.base import Method
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan, edge_tensors
from hubmerge.sources import ModelSource


def plan(config: PassthroughConfig, sources: Mapping[str, ModelSource]) -> MergePlan:
    layers: list[LayerPlan] = []
    for i, out_slice in enumerate(config.slices):
        source = out_slice.sources[0]
        model = sources[source.model]
        start, end = source.layer_range
        if end > model.num_layers:
            raise ConfigError(
                f"slices[{i}].sources[0].layer_range: [{start}, {end}] is out of bounds for "
                f"{source.model} ({model.num_layers} layers)"
            )
        levels = [source.parameters, out_slice.parameters, config.parameters]
        count = end - start
        for k in range(count):
            t = k / (count - 1) if count > 1 else 1.0
            index = start + k
            scales = {
                suffix: s
                for suffix in model.layers[index]
                if (s := _scale(arch.layer_name(index, suffix), t, levels)) != 1.0
            }
            layers.append(LayerPlan(source.model, index, scales))

    def edge(i: int, t: float, pre: bool) -> EdgePlan:
        out_slice = config.slices[i]
        model = out_slice.sources[0].model
        levels = [out_slice.sources[0].parameters, out_slice.parameters, config.parameters]
        scales = {
            n: s
            for n in edge_tensors(sources[model], pre=pre)
            if (s := _scale(n, t, levels)) != 1.0
        }
        return EdgePlan(model, scales)

    donor = config.base_model or config.slices[0].sources[0].model
    tokenizer = config.tokenizer_source or donor
    return MergePlan(
        method="passthrough",
        layers=layers,
        embed=edge(0, 0.0, pre=True),
        head=edge(-1, 1.0, pre=False),
        donor=donor,
        tokenizer=donor if tokenizer == "base" else tokenizer,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=config.referenced_models(),
    )


METHOD = Method("passthrough", PassthroughConfig, preview=plan)


def _scale(name: str, t: float, levels: list[Parameters | None]) -> float:
    value = resolve([params.scale if params else None for params in levels], name, t)
    return 1.0 if value is None else value


def resolve(settings: list[ScaleSetting | None], name: str, t: float) -> float | None:
    """mergekit's lookup: the first setting, most specific first, that yields a value."""
    for setting in settings:
        if setting is not None and (value := evaluate(setting, name, t)) is not None:
            return value
    return None


def evaluate(setting: ScaleSetting, name: str, t: float) -> float | None:
    """The value of one scale setting for tensor `name` at position t, or None if no rule hits."""
    if isinstance(setting, float | int):
        return float(setting)
    if _is_rules(setting):
        for rule in setting:
            if rule.filter in (None, "*") or rule.filter in name:
                return _gradient(rule.value, t)
        return None
    return _gradient(setting, t)


def _is_rules(setting: list[float] | list[ScaleRule]) -> TypeIs[list[ScaleRule]]:
    """Whether a list setting is `{filter, value}` rules (pydantic keeps the two forms apart)."""
    return bool(setting) and isinstance(setting[0], ScaleRule)


def _gradient(value: float | Gradient, t: float) -> float:
    if isinstance(value, float | int):
        return float(value)
    if len(value) == 1:
        return float(value[0])
    return float(np.interp(t, np.linspace(0.0, 1.0, len(value)), value))
