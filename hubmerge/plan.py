"""The merge plan: which source tensor, scaled by what, lands where.

Every method compiles to a `MergePlan`; one writer executes every plan. A plan also prints as a
mergekit-compatible passthrough YAML (`to_recipe`), which `hubmerge merge` (and mergekit) turn
back into the same model, so every merged model carries the recipe that rebuilds it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from hubmerge import arch
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import TensorInfo


@dataclass(frozen=True)
class LayerPlan:
    """One output layer: a whole source layer, with per-tensor scales (suffix -> factor).

    `overrides` (suffix -> (model, layer)) takes single tensors from elsewhere: how a layer is
    assembled module by module (NER's `granularity: module`). Every other tensor, and the
    layer's config entries (`layer_types`), come from `model`'s layer `layer`.
    """

    model: str
    layer: int
    scales: Mapping[str, float] = field(default_factory=dict)
    overrides: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    @classmethod
    def from_choices(cls, choices: Mapping[str, tuple[str, int]]) -> LayerPlan:
        """The layer that takes each tensor (suffix) from its chosen (model, layer).

        The (model, layer) chosen most often (the first such on a tie) becomes the layer's
        source and the rest overrides, so planning and reading back a recipe agree on one form.
        """
        counts = Counter(choices.values())
        model, layer = max(counts, key=counts.__getitem__)
        overrides = {s: c for s, c in choices.items() if c != (model, layer)}
        return cls(model, layer, overrides=overrides)


@dataclass(frozen=True)
class EdgePlan:
    """Tensors outside the blocks (embeddings, or final norm and `lm_head`) and their scales."""

    model: str
    scales: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its name, where its bytes come from, and the arithmetic."""

    name: str
    source: TensorInfo
    scale: float


@dataclass
class MergePlan:
    """A complete, validated description of the output model."""

    method: str
    layers: list[LayerPlan]
    embed: EdgePlan
    head: EdgePlan
    #: config.json and generation_config.json come from here; the tokenizer from `tokenizer`.
    donor: str
    tokenizer: str
    #: mergekit's `dtype` (tensors are cast to it before scaling) and `out_dtype`.
    dtype: str | None = None
    out_dtype: str | None = None
    #: Every model that contributes, base first: the card's lineage.
    models: list[str] = field(default_factory=list)

    @classmethod
    def from_base(
        cls,
        method: str,
        base: str,
        layers: list[LayerPlan],
        *,
        dtype: str | None,
        out_dtype: str | None,
        models: list[str],
    ) -> MergePlan:
        """A plan whose embeddings, head, config and tokenizer all come from `base`."""
        return cls(
            method, layers, EdgePlan(base), EdgePlan(base), base, base, dtype, out_dtype, models
        )

    def tensors(self, sources: Mapping[str, ModelSource]) -> Iterator[OutputTensor]:
        """Every output tensor in file order: embeddings, the layers, then the head."""
        for name, info in edge_tensors(sources[self.embed.model], pre=True).items():
            yield OutputTensor(name, info, self.embed.scales.get(name, 1.0))
        for index, layer in enumerate(self.layers):
            for suffix, info in sources[layer.model].layers[layer.layer].items():
                if suffix in layer.overrides:
                    model, source_layer = layer.overrides[suffix]
                    info = sources[model].layers[source_layer][suffix]
                yield OutputTensor(
                    arch.layer_name(index, suffix), info, layer.scales.get(suffix, 1.0)
                )
        for name, info in edge_tensors(sources[self.head.model], pre=False).items():
            yield OutputTensor(name, info, self.head.scales.get(name, 1.0))

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The layer map: (output layer, source model, source layer, scales) per output layer.

        A layer with overrides gets one more row per other source, naming the modules it gives
        (`3: q_proj, o_proj`); the layer's own row stands for the rest.
        """
        rows = [("embed", self.embed.model, "-", _scales_text(self.embed.scales))]
        for index, layer in enumerate(self.layers):
            rows.append((str(index), layer.model, str(layer.layer), _scales_text(layer.scales)))
            by_source: dict[tuple[str, int], list[str]] = {}
            for suffix, source in layer.overrides.items():
                by_source.setdefault(source, []).append(suffix)
            for (model, source_layer), suffixes in by_source.items():
                modules = ", ".join(dict.fromkeys(_module(s) for s in suffixes))
                scales = {s: v for s, v in layer.scales.items() if s in suffixes}
                rows.append((f"{index}: {modules}", model, str(source_layer), _scales_text(scales)))
        rows.append(("head", self.head.model, "-", _scales_text(self.head.scales)))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (`hubmerge_plan.json`): what cards and the Space read."""
        return {
            "method": self.method,
            "models": self.models,
            "donor": self.donor,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "embed": {"model": self.embed.model, "scales": dict(self.embed.scales)},
            "layers": [_layer_dict(layer) for layer in self.layers],
            "head": {"model": self.head.model, "scales": dict(self.head.scales)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergePlan:
        """`to_dict()` read back (raises KeyError or TypeError on data of another shape)."""
        return cls(
            method=data["method"],
            layers=[
                LayerPlan(
                    d["model"],
                    d["layer"],
                    d["scales"],
                    {s: (o["model"], o["layer"]) for s, o in d.get("overrides", {}).items()},
                )
                for d in data["layers"]
            ],
            embed=EdgePlan(data["embed"]["model"], data["embed"]["scales"]),
            head=EdgePlan(data["head"]["model"], data["head"]["scales"]),
            donor=data["donor"],
            tokenizer=data["tokenizer"],
            dtype=data.get("dtype"),
            out_dtype=data.get("out_dtype"),
            models=data["models"],
        )

    def to_recipe(self, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
        """The mergekit passthrough config that rebuilds this plan exactly.

        Consecutive layers of one model with equal scales become one slice. Scales become
        `{filter, value}` rules checked against mergekit's first-match substring semantics.
        When the embeddings or head come from another model than the first or last layer,
        a zero-width slice names their donor, as mergekit expects. Passthrough cannot take
        single tensors from other models: a plan with overrides becomes a `linear` recipe.
        """
        if any(layer.overrides for layer in self.layers):
            # Imported here: the linear method builds on this module.
            from hubmerge.methods.linear import selection_recipe

            return selection_recipe(self, sources)
        groups: list[tuple[str, int, int, dict[str, float]]] = []
        for layer in self.layers:
            last = groups[-1] if groups else None
            if (
                last
                and last[0] == layer.model
                and last[2] == layer.layer
                and last[3] == layer.scales
            ):
                groups[-1] = (last[0], last[1], last[2] + 1, last[3])
            else:
                groups.append((layer.model, layer.layer, layer.layer + 1, dict(layer.scales)))
        if groups[0][0] != self.embed.model or self.embed.scales:
            groups.insert(0, (self.embed.model, 0, 0, {}))
        if groups[-1][0] != self.head.model or self.head.scales:
            n = sources[self.head.model].num_layers
            groups.append((self.head.model, n, n, {}))

        slices = []
        for i, (model, start, end, scales) in enumerate(groups):
            source: dict[str, Any] = {"model": model, "layer_range": [start, end]}
            owned = {
                arch.layer_name(j, s): scales.get(s, 1.0)
                for j in range(start, end)
                for s in sources[model].layers[j]
            }
            if i == 0:
                owned |= {
                    n: self.embed.scales.get(n, 1.0) for n in edge_tensors(sources[model], pre=True)
                }
            if i == len(groups) - 1:
                owned |= {
                    n: self.head.scales.get(n, 1.0) for n in edge_tensors(sources[model], pre=False)
                }
            rules = filter_rules(owned)
            if rules:
                source["parameters"] = {"scale": rules}
            slices.append({"sources": [source]})
        return self.recipe_with("passthrough", slices)

    def recipe_with(self, method: str, slices: list[dict[str, Any]]) -> dict[str, Any]:
        """A mergekit config of `method` over `slices`, with this plan's donors and dtypes."""
        recipe: dict[str, Any] = {
            "merge_method": method,
            "base_model": self.donor,
            "slices": slices,
        }
        if self.tokenizer != self.donor:
            recipe["tokenizer_source"] = self.tokenizer
        if self.dtype:
            recipe["dtype"] = self.dtype
        if self.out_dtype and self.out_dtype != self.dtype:
            recipe["out_dtype"] = self.out_dtype
        return recipe


def recipe_yaml(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=100)


def edge_tensors(source: ModelSource, *, pre: bool) -> dict[str, TensorInfo]:
    return {n: t for n, t in source.non_layer.items() if arch.is_pre_weight(n) == pre}


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": layer.model,
        "layer": layer.layer,
        "scales": dict(layer.scales),
    }
    if layer.overrides:
        data["overrides"] = {s: {"model": m, "layer": i} for s, (m, i) in layer.overrides.items()}
    return data


def _scales_text(scales: Mapping[str, float]) -> str:
    if not scales:
        return "1.0"
    by_value: dict[float, list[str]] = {}
    for name, value in scales.items():
        by_value.setdefault(value, []).append(_module(name))
    return ", ".join(
        f"{'/'.join(sorted(set(names)))} x{value:g}" for value, names in by_value.items()
    )


def _module(name: str) -> str:
    """`model.layers.3.self_attn.o_proj.weight` -> `o_proj`: the short name people write."""
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]


def filter_rules(owned: Mapping[str, float], default: float = 1.0) -> list[dict[str, Any]]:
    """Filter rules that give every tensor in `owned` (source name -> value) its value.

    Prefers the short module name (`o_proj`), falling back to the tensor's full name when the
    short filter would also catch a tensor that must keep another value. A final catch-all
    rule gives the rest `default`.
    """
    scaled = {n: v for n, v in owned.items() if v != default}
    if not scaled:
        return []
    rules: list[dict[str, Any]] = []
    covered: set[str] = set()
    for name, value in scaled.items():
        if name in covered:
            continue
        short = _module(name)
        hits = {n for n in owned if short in n and n not in covered}
        if all(owned[n] == value for n in hits):
            rules.append({"filter": short, "value": value})
            covered |= hits
        else:
            rules.append({"filter": name, "value": value})
            covered.add(name)
    rules.append({"value": default})
    return rules
