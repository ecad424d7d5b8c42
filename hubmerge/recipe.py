"""Recipes: the mergekit configs that rebuild a merged model, written from its plan.

Every merged model carries `mergekit_config.yml`. A plan that takes whole layers (with scales)
becomes a mergekit `passthrough` config; a plan that takes single tensors from other models or
blends them becomes a `linear` config with per-tensor weight filters (`selection_recipe`), which
mergekit and hubmerge both build into the same model. Hub models are pinned to the commit that
was read (`pin_models`). Reading a recipe back is reading a config: `config.load_config` and the
`passthrough` and `linear` methods.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hubmerge import arch
from hubmerge.folder import RECIPE_FILE, read_yaml, yaml_text
from hubmerge.plan import EdgePlan, MergePlan, edge_tensors, module_of
from hubmerge.sources import ModelSource


def write_recipe(recipe: Mapping[str, Any], folder: Path) -> None:
    """Write `RECIPE_FILE` into `folder`."""
    (Path(folder) / RECIPE_FILE).write_text(yaml_text(recipe))


def read_recipe(folder: Path) -> dict[str, Any]:
    """The folder's recipe as data (empty when it has none)."""
    return read_yaml(Path(folder), RECIPE_FILE) or {}


def plan_recipe(plan: MergePlan, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    """The mergekit config that rebuilds `plan` exactly: passthrough where it can.

    Consecutive layers of one model with equal scales become one slice. Scales become
    `{filter, value}` rules checked against mergekit's first-match substring semantics.
    When the embeddings or head come from another model than the first or last layer,
    a zero-width slice names their donor, as mergekit expects. Passthrough cannot take
    single tensors from other models nor blend them: a plan with overrides or blends
    becomes a `linear` recipe.
    Hub models are pinned to the commit that was read (`pin_models`).
    """
    if (
        plan.embed.blends
        or plan.head.blends
        or any(layer.overrides or layer.blends for layer in plan.layers)
    ):
        return pin_models(selection_recipe(plan, sources), sources)
    groups: list[tuple[str, int, int, dict[str, float]]] = []
    for layer in plan.layers:
        last = groups[-1] if groups else None
        if last and last[0] == layer.model and last[2] == layer.layer and last[3] == layer.scales:
            groups[-1] = (last[0], last[1], last[2] + 1, last[3])
        else:
            groups.append((layer.model, layer.layer, layer.layer + 1, dict(layer.scales)))
    if groups[0][0] != plan.embed.model or plan.embed.scales:
        groups.insert(0, (plan.embed.model, 0, 0, {}))
    if groups[-1][0] != plan.head.model or plan.head.scales:
        n = sources[plan.head.model].num_layers
        groups.append((plan.head.model, n, n, {}))

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
                n: plan.embed.scales.get(n, 1.0) for n in edge_tensors(sources[model], pre=True)
            }
        if i == len(groups) - 1:
            owned |= {
                n: plan.head.scales.get(n, 1.0) for n in edge_tensors(sources[model], pre=False)
            }
        rules = filter_rules(owned)
        if rules:
            source["parameters"] = {"scale": rules}
        slices.append({"sources": [source]})
    return pin_models(recipe_with(plan, "passthrough", slices), sources)


def recipe_with(plan: MergePlan, method: str, slices: list[dict[str, Any]]) -> dict[str, Any]:
    """A mergekit config of `method` over `slices`, with this plan's donors and dtypes."""
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": plan.donor,
        "slices": slices,
    }
    if plan.tokenizer != plan.donor:
        recipe["tokenizer_source"] = plan.tokenizer
    if plan.dtype:
        recipe["dtype"] = plan.dtype
    if plan.out_dtype and plan.out_dtype != plan.dtype:
        recipe["out_dtype"] = plan.out_dtype
    return recipe


#: The keys of a mergekit config whose values name a model.
MODEL_KEYS = ("model", "base_model", "tokenizer_source")


def pin_models(recipe: Any, sources: Mapping[str, ModelSource]) -> Any:
    """`recipe` (a mergekit config, or any part of one) with every model reference pinned.

    A Hub model becomes `org/name@<commit>`, the commit its files were read from, so the recipe
    rebuilds the same model after the donor is updated on the Hub; local folders stay as given.
    Every method that writes a mergekit config passes it through here.
    """
    if isinstance(recipe, list):
        return [pin_models(item, sources) for item in recipe]
    if not isinstance(recipe, dict):
        return recipe
    pinned = {}
    for key, value in recipe.items():
        if key in MODEL_KEYS and isinstance(value, str) and value in sources:
            pinned[key] = sources[value].pinned
        else:
            pinned[key] = pin_models(value, sources)
    return pinned


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
        short = module_of(name)
        hits = {n for n in owned if short in n and n not in covered}
        if all(owned[n] == value for n in hits):
            rules.append({"filter": short, "value": value})
            covered |= hits
        else:
            rules.append({"filter": name, "value": value})
            covered.add(name)
    rules.append({"value": default})
    return rules


def selection_recipe(plan: MergePlan, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    """The mergekit `linear` config, with per-tensor weight filters, that rebuilds `plan` exactly.

    Consecutive output layers whose tensors have the same terms become one slice; each slice
    lists the models it takes something from, the first slice the embeddings' donors too and
    the last slice the head's (listed first there, as mergekit merges the head from only as
    many of the last slice's models as the first slice has). A source's rules give each
    tensor its weight: 1 or 0 for a selection, the blend's weight for a blended tensor; a plan
    with blends sets `normalize: false`, so mergekit adds the weighted tensors and divides by
    nothing, as `tensorfile.weighted_sum` does.
    """
    if plan.embed.scales or plan.head.scales or any(layer.scales for layer in plan.layers):
        raise ValueError("a plan with both scales and overrides has no mergekit form")
    groups: list[tuple[dict[str, dict[str, float]], dict[str, int], int]] = []
    for layer in plan.layers:
        weights: dict[str, dict[str, float]] = {}
        starts: dict[str, int] = {}
        for suffix in sources[layer.model].layers[layer.layer]:
            weights[suffix] = {}
            for model, index, weight in layer.terms(suffix):
                if starts.setdefault(model, index) != index or model in weights[suffix]:
                    raise ValueError(f"output layer takes two layers of {model}: no mergekit form")
                weights[suffix][model] = weight
        last = groups[-1] if groups else None
        if last and last[0] == weights and all(starts[m] == last[1][m] + last[2] for m in starts):
            groups[-1] = (last[0], last[1], last[2] + 1)
        else:
            groups.append((weights, starts, 1))

    embed = _EdgeTerms(plan.embed, sources, pre=True)
    head = _EdgeTerms(plan.head, sources, pre=False)
    canonical = _sum_order(plan)
    slices = []
    first_width = 0
    for g, (weights, starts, count) in enumerate(groups):
        given = Counter(m for terms in weights.values() for m, w in terms.items() if w)
        owner = given.most_common(1)[0][0]
        members = {*starts, *(embed.models if g == 0 else ())}
        order = sorted(members | set(head.models if g == len(groups) - 1 else ()),
                       key=canonical.index)  # fmt: skip
        first_width = first_width or len(order)
        blended = any(len(terms) > 1 for terms in weights.values())
        if g == len(groups) - 1 and not (blended or plan.head.blends):
            order = [*head.models, *(m for m in order if m not in head.models)]
        elif g == len(groups) - 1 and not set(head.models) <= set(order[:first_width]):
            # mergekit merges the head from the first `first_width` sources of the last slice;
            # a slice of blends sums in `canonical` order, so it cannot move the head first.
            raise ValueError("the head's donors do not lead a slice of blends: no mergekit form")
        entries = []
        for model in order:
            start = starts.get(model, starts[owner])
            if start + count > sources[model].num_layers:
                raise ValueError(f"{model} has no layers {start}..{start + count - 1}")
            owned = {
                arch.layer_name(start + k, suffix): terms.get(model, 0.0)
                for k in range(count)
                for suffix, terms in weights.items()
            }
            if g == 0:
                owned |= embed.weights(model)
            if g == len(groups) - 1:
                owned |= head.weights(model)
            default = Counter(owned.values()).most_common(1)[0][0]
            entries.append(
                {
                    "model": model,
                    "layer_range": [start, start + count],
                    "parameters": {"weight": filter_rules(owned, default) or [{"value": default}]},
                }
            )
        slices.append({"sources": entries})
    recipe = recipe_with(plan, "linear", slices)
    if plan.embed.blends or plan.head.blends or any(layer.blends for layer in plan.layers):
        recipe["parameters"] = {"normalize": False}
    return recipe


def _sum_order(plan: MergePlan) -> list[str]:
    """One order of models in which every blend of `plan` sums its terms (mergekit sums in the
    order of a slice's sources); a `ValueError` if two blends sum in different orders."""
    orders = [[m for m, _, _ in t] for layer in plan.layers for t in layer.blends.values()]
    orders += [[m for m, _ in t] for edge in (plan.embed, plan.head) for t in edge.blends.values()]
    canonical = list(dict.fromkeys([m for order in orders for m in order] + plan.models))
    canonical += [layer.model for layer in plan.layers if layer.model not in canonical]
    canonical += [m for layer in plan.layers for m, _ in layer.overrides.values()]
    canonical = list(dict.fromkeys([*canonical, plan.embed.model, plan.head.model]))
    for order in orders:
        if [canonical.index(m) for m in order] != sorted(canonical.index(m) for m in order):
            raise ValueError("blends sum their models in different orders: no mergekit form")
    return canonical


class _EdgeTerms:
    """Per model, the weight of each embedding (or head) tensor in the recipe."""

    def __init__(self, edge: EdgePlan, sources: Mapping[str, ModelSource], *, pre: bool) -> None:
        self.names = list(edge_tensors(sources[edge.model], pre=pre))
        self.terms = {
            n: dict(edge.blends[n]) if n in edge.blends else {edge.model: 1.0} for n in self.names
        }
        self.models = list(dict.fromkeys(m for terms in self.terms.values() for m in terms))

    def weights(self, model: str) -> dict[str, float]:
        return {n: self.terms[n].get(model, 0.0) for n in self.names}
