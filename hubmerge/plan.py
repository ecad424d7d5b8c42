"""The merge plan: which source tensor, scaled by what, lands where.

Every method compiles to a `MergePlan`; one writer executes every plan. `recipe.py` prints a
plan as the mergekit config that `hubmerge merge` (and mergekit) turn back into the same model,
so every merged model carries the recipe that rebuilds it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hubmerge import arch
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import TensorInfo

#: A blended layer tensor: sum of weight x (model's tensor of that layer), in term order.
LayerBlend = tuple[tuple[str, int, float], ...]
#: A blended embedding or head tensor: sum of weight x (model's tensor of that name).
EdgeBlend = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LayerPlan:
    """One output layer: a whole source layer, with per-tensor scales (suffix -> factor).

    `overrides` (suffix -> (model, layer)) takes single tensors from elsewhere: how a layer is
    assembled module by module (NER's `granularity: module`). `blends` (suffix -> terms) makes
    a tensor a new one, the weighted sum of the terms' tensors (mergekit's `linear` with
    `normalize: false`): OLM's mean and task-arithmetic candidates. Every other tensor, and the
    layer's config entries (`layer_types`), come from `model`'s layer `layer`.
    """

    model: str
    layer: int
    scales: Mapping[str, float] = field(default_factory=dict)
    overrides: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    blends: Mapping[str, LayerBlend] = field(default_factory=dict)

    @classmethod
    def blended(cls, terms: LayerBlend, suffixes: Iterable[str]) -> LayerPlan:
        """The layer whose every tensor (`suffixes`) is the weighted sum `terms`."""
        model, layer, _ = terms[0]
        return cls(model, layer, blends=dict.fromkeys(suffixes, terms))

    def contributors(self) -> set[str]:
        """Every model at least one of this layer's tensors is read from (the card's count)."""
        models = {self.model} | {model for model, _ in self.overrides.values()}
        return models | {m for terms in self.blends.values() for m, _, w in terms if w != 0}

    def terms(self, suffix: str) -> LayerBlend:
        """What tensor `suffix` of this layer is, as weighted terms (a selection is weight 1)."""
        if suffix in self.blends:
            return self.blends[suffix]
        model, layer = self.overrides.get(suffix, (self.model, self.layer))
        return ((model, layer, 1.0),)

    @classmethod
    def from_choices(
        cls, choices: Mapping[str, tuple[str, int]], blends: Mapping[str, LayerBlend] | None = None
    ) -> LayerPlan:
        """The layer that takes each tensor (suffix) from its chosen (model, layer), or blends.

        The (model, layer) chosen most often (the first such on a tie) becomes the layer's
        source and the rest overrides, so planning and reading back a recipe agree on one form.
        A layer of blends only takes its source from its first blend's first term.
        """
        blends = dict(blends or {})
        if not choices:
            model, layer, _ = next(iter(blends.values()))[0]
            return cls(model, layer, blends=blends)
        counts = Counter(choices.values())
        model, layer = max(counts, key=counts.__getitem__)
        overrides = {s: c for s, c in choices.items() if c != (model, layer)}
        return cls(model, layer, overrides=overrides, blends=blends)


@dataclass(frozen=True)
class EdgePlan:
    """Tensors outside the blocks (embeddings, or final norm and `lm_head`) and their scales."""

    model: str
    scales: Mapping[str, float] = field(default_factory=dict)
    #: Tensor name -> weighted terms: a tensor that is a blend (a whole-model mean, say).
    blends: Mapping[str, EdgeBlend] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its name, where its bytes come from, and the arithmetic.

    With `terms` the tensor is their weighted sum (`source` is the first term's, for shape).
    """

    name: str
    source: TensorInfo
    scale: float
    terms: tuple[tuple[TensorInfo, float], ...] = ()


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
        yield from _edge_outputs(self.embed, sources, pre=True)
        for index, layer in enumerate(self.layers):
            for suffix, info in sources[layer.model].layers[layer.layer].items():
                name = arch.layer_name(index, suffix)
                if suffix in layer.blends:
                    terms = tuple(
                        (sources[m].layers[i][suffix], w) for m, i, w in layer.blends[suffix]
                    )
                    yield OutputTensor(name, terms[0][0], 1.0, terms)
                    continue
                if suffix in layer.overrides:
                    model, source_layer = layer.overrides[suffix]
                    info = sources[model].layers[source_layer][suffix]
                yield OutputTensor(name, info, layer.scales.get(suffix, 1.0))
        yield from _edge_outputs(self.head, sources, pre=False)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The layer map: (output layer, source model, source layer, scales) per output layer.

        A layer with overrides gets one more row per other source, naming the modules it gives
        (`3: q_proj, o_proj`); the layer's own row stands for the rest.
        """
        rows = [("embed", _edge_text(self.embed), "-", _scales_text(self.embed.scales))]
        for index, layer in enumerate(self.layers):
            if layer.blends:
                rows += _blend_rows(index, layer)
                continue
            rows.append((str(index), layer.model, str(layer.layer), _scales_text(layer.scales)))
            by_source: dict[tuple[str, int], list[str]] = {}
            for suffix, source in layer.overrides.items():
                by_source.setdefault(source, []).append(suffix)
            for (model, source_layer), suffixes in by_source.items():
                modules = ", ".join(dict.fromkeys(module_of(s) for s in suffixes))
                scales = {s: v for s, v in layer.scales.items() if s in suffixes}
                rows.append((f"{index}: {modules}", model, str(source_layer), _scales_text(scales)))
        rows.append(("head", _edge_text(self.head), "-", _scales_text(self.head.scales)))
        return rows

    def renamed(self, name: Callable[[str], str]) -> MergePlan:
        """This plan with every model reference `r` replaced by `name(r)`: how the CLI's plan
        table and the card show models by the names people know (see `sources.public_name`).
        """
        return replace(
            self,
            layers=[
                replace(
                    layer,
                    model=name(layer.model),
                    overrides={s: (name(m), i) for s, (m, i) in layer.overrides.items()},
                    blends={
                        s: tuple((name(m), i, w) for m, i, w in terms)
                        for s, terms in layer.blends.items()
                    },
                )
                for layer in self.layers
            ],
            embed=_renamed_edge(self.embed, name),
            head=_renamed_edge(self.head, name),
            donor=name(self.donor),
            tokenizer=name(self.tokenizer),
            models=[name(m) for m in self.models],
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (`hubmerge_plan.json`): what cards and the Space read."""
        return {
            "method": self.method,
            "models": self.models,
            "donor": self.donor,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "embed": _edge_dict(self.embed),
            "layers": [_layer_dict(layer) for layer in self.layers],
            "head": _edge_dict(self.head),
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
                    {
                        s: tuple((t["model"], t["layer"], t["weight"]) for t in terms)
                        for s, terms in d.get("blends", {}).items()
                    },
                )
                for d in data["layers"]
            ],
            embed=_edge_from_dict(data["embed"]),
            head=_edge_from_dict(data["head"]),
            donor=data["donor"],
            tokenizer=data["tokenizer"],
            dtype=data.get("dtype"),
            out_dtype=data.get("out_dtype"),
            models=data["models"],
        )


def edge_tensors(source: ModelSource, *, pre: bool) -> dict[str, TensorInfo]:
    return {n: t for n, t in source.non_layer.items() if arch.is_pre_weight(n) == pre}


def _renamed_edge(edge: EdgePlan, name: Callable[[str], str]) -> EdgePlan:
    blends = {n: tuple((name(m), w) for m, w in terms) for n, terms in edge.blends.items()}
    return replace(edge, model=name(edge.model), blends=blends)


def compact_rows(rows: Sequence[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
    """`rows` (from `MergePlan.rows`) with runs of identical rows summarised: consecutive
    output layers from one model's consecutive layers, at the same scales, become one row
    (`0-99 | model | 0-99 | 1.0`), so a plan of thousands of layers prints as a few lines.
    """
    out: list[tuple[str, str, str, str]] = []
    run: list[tuple[str, str, str, str]] = []

    def flush() -> None:
        if len(run) > 2:
            first, last = run[0], run[-1]
            out.append((f"{first[0]}-{last[0]}", first[1], f"{first[2]}-{last[2]}", first[3]))
        else:
            out.extend(run)
        run.clear()

    for row in rows:
        previous = run[-1] if run else None
        if (
            previous is not None
            and row[0].isdigit()
            and row[2].isdigit()
            and (row[1], row[3]) == (previous[1], previous[3])
            and int(row[0]) == int(previous[0]) + 1
            and int(row[2]) == int(previous[2]) + 1
        ):
            run.append(row)
            continue
        flush()
        if row[0].isdigit() and row[2].isdigit():
            run.append(row)
        else:
            out.append(row)
    flush()
    return out


def _edge_outputs(
    edge: EdgePlan, sources: Mapping[str, ModelSource], *, pre: bool
) -> Iterator[OutputTensor]:
    for name, info in edge_tensors(sources[edge.model], pre=pre).items():
        if name in edge.blends:
            terms = tuple((sources[m].tensors[name], w) for m, w in edge.blends[name])
            yield OutputTensor(name, terms[0][0], 1.0, terms)
        else:
            yield OutputTensor(name, info, edge.scales.get(name, 1.0))


def blend_text(terms: Iterable[tuple[str, float]]) -> str:
    """`0.5 a + 0.5 b`: a blend as people read it."""
    return " + ".join(f"{w:.4g} {m}" for m, w in terms).replace("+ -", "- ")


def _edge_text(edge: EdgePlan) -> str:
    kinds = set(edge.blends.values())
    return blend_text(kinds.pop()) if len(kinds) == 1 else edge.model


def _blend_rows(index: int, layer: LayerPlan) -> list[tuple[str, str, str, str]]:
    """One row per distinct blend or source of a layer that has blended tensors."""
    parts: dict[str, list[str]] = {}
    layers: dict[str, str] = {}
    for suffix, terms in layer.blends.items():
        text = blend_text((m, w) for m, _, w in terms)
        parts.setdefault(text, []).append(suffix)
        layers[text] = "/".join(dict.fromkeys(str(i) for _, i, _ in terms))
    if len(parts) == 1 and not layer.overrides:
        (text,) = parts
        return [(str(index), text, layers[text], "1.0")]
    rows = [(str(index), layer.model, str(layer.layer), _scales_text(layer.scales))]
    for text, suffixes in parts.items():
        modules = ", ".join(dict.fromkeys(module_of(s) for s in suffixes))
        rows.append((f"{index}: {modules}", text, layers[text], "1.0"))
    return rows


def _edge_dict(edge: EdgePlan) -> dict[str, Any]:
    data: dict[str, Any] = {"model": edge.model, "scales": dict(edge.scales)}
    if edge.blends:
        data["blends"] = {
            n: [{"model": m, "weight": w} for m, w in terms] for n, terms in edge.blends.items()
        }
    return data


def _edge_from_dict(data: Mapping[str, Any]) -> EdgePlan:
    blends = {
        n: tuple((t["model"], t["weight"]) for t in terms)
        for n, terms in data.get("blends", {}).items()
    }
    return EdgePlan(data["model"], data["scales"], blends)


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": layer.model,
        "layer": layer.layer,
        "scales": dict(layer.scales),
    }
    if layer.overrides:
        data["overrides"] = {s: {"model": m, "layer": i} for s, (m, i) in layer.overrides.items()}
    if layer.blends:
        data["blends"] = {
            s: [{"model": m, "layer": i, "weight": w} for m, i, w in terms]
            for s, terms in layer.blends.items()
        }
    return data


def _scales_text(scales: Mapping[str, float]) -> str:
    if not scales:
        return "1.0"
    by_value: dict[float, list[str]] = {}
    for name, value in scales.items():
        by_value.setdefault(value, []).append(module_of(name))
    return ", ".join(
        f"{'/'.join(sorted(set(names)))} x{value:g}" for value, names in by_value.items()
    )


def module_of(name: str) -> str:
    """`model.layers.3.self_attn.o_proj.weight` -> `o_proj`: the short name people write."""
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
