"""LLaMA Pro block expansion (arXiv 2401.02415): identity blocks added to a model.

Each new block is a copy of an existing layer whose output projections (`o_proj`, `down_proj`
and their biases by default) are zeroed, so its residual branch adds nothing: the expanded
model computes exactly what the original did, and the new blocks can then be trained.
`interleave: N` inserts a copy after every N original layers (the paper's layout); `append: K`
adds K copies of the last layer at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

from hubmerge.config import BlockExpansionConfig
from hubmerge.errors import ConfigError
from hubmerge.methods.base import Method
from hubmerge.plan import LayerPlan, MergePlan
from hubmerge.sources import ModelSource


def plan(config: BlockExpansionConfig, sources: Mapping[str, ModelSource]) -> MergePlan:
    model = sources[config.model]
    depth = model.num_layers
    if config.interleave is not None:
        if config.interleave > depth:
            raise ConfigError(f"interleave: {config.interleave} exceeds the model's {depth} layers")
        copies = [i for i in range(depth) if (i + 1) % config.interleave == 0]
    else:
        copies = [depth - 1] * (config.append or 0)

    zeroed = _zeroed(config, model)
    layers: list[LayerPlan] = []
    for index in range(depth):
        layers.append(LayerPlan(config.model, index))
        if config.interleave is not None and index in copies:
            layers.append(LayerPlan(config.model, index, zeroed[index]))
    if config.append is not None:
        layers += [LayerPlan(config.model, depth - 1, zeroed[depth - 1]) for _ in copies]
    return MergePlan.from_base(
        "block_expansion",
        config.model,
        layers,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=[config.model],
    )


METHOD = Method("block_expansion", BlockExpansionConfig, preview=plan)


def _zeroed(config: BlockExpansionConfig, model: ModelSource) -> list[dict[str, float]]:
    """Per layer, the tensors to zero: every one whose name contains a `zero` entry."""
    result = []
    for index, tensors in enumerate(model.layers):
        scales = {s: 0.0 for s in tensors if any(z in s for z in config.zero)}
        for z in config.zero:
            if not any(z in s for s in tensors):
                raise ConfigError(
                    f"zero: {z!r} matches no tensor in layer {index} of {config.model}"
                )
        result.append(scales)
    return result
