"""Layer naming and config rewrites for the decoder-only architectures hubmerge supports.

All of them store their blocks as `model.layers.N.*`, embeddings as `model.embed_tokens.*`, and
everything after the blocks (final norm, `lm_head`) outside that prefix. An architecture not in
`SUPPORTED` is refused rather than guessed: a wrong guess would produce a model that loads but
computes nonsense.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hubmerge.errors import SourceError, quoted
from hubmerge.limits import MAX_LAYERS

#: `config.json` `architectures` entries hubmerge knows the layout of.
SUPPORTED: frozenset[str] = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
    }
)

LAYER_PREFIX = "model.layers."
EMBED_PREFIX = "model.embed_tokens."
#: A layer number as transformers writes it: no leading zeros (`00` would shadow `0`).
_LAYER_RE = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,8})\.(.+)$")

#: Fields that must match for layers of two models to be stacked.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def check_config(config: dict[str, Any], where: str) -> None:
    """Refuse a `config.json` whose values hubmerge relies on are not what they must be.

    The architecture must be supported, `num_hidden_layers` a plain integer within
    `MAX_LAYERS` (a billion layers would be planned and allocated for), and the shape fields
    positive integers, so comparing and reporting them is safe.
    """
    architecture(config, where)
    num_layers(config, where)
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if value is not None and not (type(value) is int and value > 0):
            raise SourceError(f"{where}: config.json: {key} must be a positive integer")
    types = config.get("layer_types")
    if types is not None and not (
        isinstance(types, list) and all(isinstance(t, str) for t in types)
    ):
        raise SourceError(f"{where}: config.json: layer_types must be a list of strings")


def architecture(config: dict[str, Any], where: str) -> str:
    """The model's architecture name, or a `SourceError` naming `where` if unsupported."""
    archs = config.get("architectures") or []
    known = isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)
    if not known or archs[0] not in SUPPORTED:
        shown = archs if isinstance(archs, list) else "a non-list"
        raise SourceError(
            f"{where}: unsupported architecture {quoted(shown or config.get('model_type'))} "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )
    return str(archs[0])


def num_layers(config: dict[str, Any], where: str) -> int:
    value = config.get("num_hidden_layers")
    if type(value) is not int or not 1 <= value <= MAX_LAYERS:
        raise SourceError(
            f"{where}: config.json: num_hidden_layers must be an integer from 1 to {MAX_LAYERS:,}"
        )
    return value


def split_layer_name(name: str) -> tuple[int, str] | None:
    """`model.layers.7.mlp.down_proj.weight` -> (7, `mlp.down_proj.weight`); None if not a layer."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_name(index: int, suffix: str) -> str:
    return f"{LAYER_PREFIX}{index}.{suffix}"


def is_pre_weight(name: str) -> bool:
    """Tensors that come before the blocks (embeddings); everything else outside them is post."""
    return name.startswith(EMBED_PREFIX)


def rewrite_config(
    donor: dict[str, Any],
    layer_sources: Sequence[tuple[dict[str, Any], int]],
    dtype_name: str,
) -> dict[str, Any]:
    """The output config: the donor's, with depth, per-layer lists and dtype made true.

    `layer_sources` gives, per output layer, the config of the model it comes from and its index
    there. Per-layer attributes (`layer_types`, sliding-window placement) travel with the layer:
    a sliding-attention block stays sliding wherever it lands.
    """
    out = dict(donor)
    depth = len(layer_sources)
    out["num_hidden_layers"] = depth
    if "layer_types" in donor:
        out["layer_types"] = [_layer_type(cfg, i) for cfg, i in layer_sources]
    if "max_window_layers" in donor:
        # Qwen2/Qwen3 use sliding attention for layers >= max_window_layers: keep that boundary
        # where the (rewritten) layer types put it.
        types = out.get("layer_types") or []
        first_sliding = next((i for i, t in enumerate(types) if t == "sliding_attention"), None)
        out["max_window_layers"] = depth if first_sliding is None else first_sliding
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    return out


def _layer_type(config: dict[str, Any], index: int) -> str:
    types = config.get("layer_types")
    if types and index < len(types):
        return str(types[index])
    return "full_attention"
