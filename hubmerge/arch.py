"""What hubmerge knows about the decoder-only architectures it supports, as one table of specs.

Each `config.json` `architectures` name hubmerge supports has one `ArchSpec` in `SPECS`: where
its blocks, embeddings, final norm and head are stored, which tensors are tied, which modules
write a block's residual output (zeroing them makes the block an identity), and which config
keys hold one value per layer and so travel with a layer. Every module reads the table instead of
spelling names itself, and an architecture not in it is refused rather than guessed: a wrong guess
would produce a model that loads but computes nonsense. `tests/test_arch.py` checks every spec
against the model transformers builds for that architecture.

The table is modelled on mergekit's `_data/architectures/*.json`, reduced to what hubmerge's own
plans need; the files a transformers model folder holds besides its weights (`config.json`'s
dtype keys, the tokenizer's files) are named here too, as they are the same for every entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any

from hubmerge.errors import SourceError, quoted
from hubmerge.limits import MAX_LAYERS


@dataclass(frozen=True)
class LayerKey:
    """A `config.json` key holding one value per layer: it is reordered with the layers."""

    name: str
    #: The value for a layer whose model's config has no such list (transformers' default).
    default: str


#: `layer_types` (full or sliding attention per layer): transformers reads it for Qwen2/3 and
#: Gemma2/3, and Mistral's config accepts it (for Ministral-style checkpoints), so wherever a
#: config carries it, it must keep one entry per output layer.
LAYER_TYPES = LayerKey("layer_types", "full_attention")


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture stores its tensors and per-layer settings (names as transformers
    writes them with `save_pretrained`)."""

    #: The `architectures` entry of `config.json`.
    name: str
    #: transformers' default for `tie_word_embeddings` when a config does not say.
    tie_default: bool
    #: Blocks are `{layer_prefix}{N}.{suffix}`.
    layer_prefix: str = "model.layers."
    #: Tensors before the blocks: the embeddings.
    embed: str = "model.embed_tokens.weight"
    #: Tensors after the blocks: the final norm and the head.
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    #: Modules (short names, as block expansion's `zero:` matches them) whose output is added to
    #: the residual stream: with their weights and biases zeroed the block passes its input on.
    residual_outputs: tuple[str, ...] = ("o_proj", "down_proj")
    #: Config keys with one entry per layer.
    layer_keys: tuple[LayerKey, ...] = (LAYER_TYPES,)
    #: A config key naming the first layer with sliding-window attention (Qwen2/3's
    #: `max_window_layers`: layers from that index on slide), kept where the layer types put it.
    first_sliding_key: str | None = None

    @property
    def embed_prefix(self) -> str:
        """The embedding module's prefix (its weight and any other tensor of it)."""
        return self.embed.rsplit(".", 1)[0] + "."

    def split_layer_name(self, name: str) -> tuple[int, str] | None:
        """`model.layers.7.mlp.down_proj.weight` -> (7, `mlp.down_proj.weight`); None if not a
        layer tensor of the plain form (a layer number with leading zeros, `00`, would shadow
        `0`, so it is not one)."""
        m = _layer_pattern(self.layer_prefix).match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{index}.{suffix}"

    def is_pre_weight(self, name: str) -> bool:
        """Tensors that come before the blocks (embeddings); everything else outside them is
        post."""
        return name.startswith(self.embed_prefix)

    def ties(self, config: dict[str, Any]) -> bool:
        """Whether a model of this config ties `lm_head` to `embed`: the head is then the
        embedding matrix and is not stored."""
        value = config.get("tie_word_embeddings", self.tie_default)
        return value if isinstance(value, bool) else self.tie_default


#: One spec per supported `architectures` name (read-only).
SPECS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ArchSpec("LlamaForCausalLM", tie_default=False),
            ArchSpec("MistralForCausalLM", tie_default=False),
            ArchSpec("Qwen2ForCausalLM", tie_default=False, first_sliding_key="max_window_layers"),
            ArchSpec("Qwen3ForCausalLM", tie_default=False, first_sliding_key="max_window_layers"),
            ArchSpec("Gemma2ForCausalLM", tie_default=True),
            ArchSpec("Gemma3ForCausalLM", tie_default=True),
            ArchSpec("Phi3ForCausalLM", tie_default=False),
        )
    }
)

#: `config.json` `architectures` entries hubmerge knows the layout of.
SUPPORTED: frozenset[str] = frozenset(SPECS)


def _shared(field: str) -> Any:
    """A spec field every architecture agrees on, for callers that have no model at hand.

    Fails at import as soon as an entry differs, so that such callers are switched to the spec
    of their model (`spec(config, where)`) instead of silently using another's layout.
    """
    values = {getattr(s, field) for s in SPECS.values()}
    if len(values) != 1:
        raise AssertionError(f"arch.SPECS disagree on {field}: read it from the model's spec")
    return values.pop()


#: The layout every supported architecture shares (see `_shared`).
LAYER_PREFIX: str = _shared("layer_prefix")
EMBED_PREFIX: str = _shared("embed_prefix")
#: Block expansion's default `zero:` list.
RESIDUAL_OUTPUTS: tuple[str, ...] = _shared("residual_outputs")

#: `config.json` keys naming the weights' dtype: transformers 5 writes `dtype`, older versions
#: `torch_dtype`; a config may carry either or both.
DTYPE_KEYS = ("dtype", "torch_dtype")

#: The files a tokenizer consists of (chat template included): copied with it into a merge.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: Chat templates kept beside `tokenizer_config.json` (which may carry one itself).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
#: JSON tokenizer files whose strings are tokens, never paths or names.
VOCABULARY_FILES = frozenset({"tokenizer.json", "vocab.json"})

#: Fields that must match for layers of two models to be stacked.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


@cache
def _layer_pattern(prefix: str) -> re.Pattern[str]:
    # A layer number as transformers writes it: no leading zeros, at most 9 digits.
    return re.compile(rf"^{re.escape(prefix)}(0|[1-9][0-9]{{0,8}})\.(.+)$")


def check_config(config: dict[str, Any], where: str) -> None:
    """Refuse a `config.json` whose values hubmerge relies on are not what they must be.

    The architecture must be supported, `num_hidden_layers` a plain integer within
    `MAX_LAYERS` (a billion layers would be planned and allocated for), the shape fields
    positive integers, so comparing and reporting them is safe, and the per-layer keys lists
    of strings.
    """
    found = spec(config, where)
    num_layers(config, where)
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if value is not None and not (type(value) is int and value > 0):
            raise SourceError(f"{where}: config.json: {key} must be a positive integer")
    for layer_key in found.layer_keys:
        values = config.get(layer_key.name)
        if values is not None and not (
            isinstance(values, list) and all(isinstance(v, str) for v in values)
        ):
            raise SourceError(f"{where}: config.json: {layer_key.name} must be a list of strings")


def spec(config: dict[str, Any], where: str) -> ArchSpec:
    """The spec of the model's architecture, or a `SourceError` naming `where` if unsupported."""
    archs = config.get("architectures") or []
    known = isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)
    if not known or archs[0] not in SPECS:
        shown = archs if isinstance(archs, list) else "a non-list"
        raise SourceError(
            f"{where}: unsupported architecture {quoted(shown or config.get('model_type'))} "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )
    return SPECS[archs[0]]


def architecture(config: dict[str, Any], where: str) -> str:
    """The model's architecture name, or a `SourceError` naming `where` if unsupported."""
    return spec(config, where).name


def num_layers(config: dict[str, Any], where: str) -> int:
    value = config.get("num_hidden_layers")
    if type(value) is not int or not 1 <= value <= MAX_LAYERS:
        raise SourceError(
            f"{where}: config.json: num_hidden_layers must be an integer from 1 to {MAX_LAYERS:,}"
        )
    return value


def config_dtype(config: dict[str, Any]) -> str | None:
    """The dtype `config.json` names for the weights (`dtype`, else `torch_dtype`), if any."""
    for key in DTYPE_KEYS:
        value = config.get(key)
        if value and isinstance(value, str):
            return value
    return None


def split_layer_name(name: str) -> tuple[int, str] | None:
    """`ArchSpec.split_layer_name` for the layout every supported architecture shares."""
    return _ANY.split_layer_name(name)


def layer_name(index: int, suffix: str) -> str:
    """`ArchSpec.layer_name` for the layout every supported architecture shares."""
    return _ANY.layer_name(index, suffix)


def is_pre_weight(name: str) -> bool:
    """`ArchSpec.is_pre_weight` for the layout every supported architecture shares."""
    return _ANY.is_pre_weight(name)


def rewrite_config(
    donor: dict[str, Any],
    layer_sources: Sequence[tuple[dict[str, Any], int]],
    dtype_name: str,
) -> dict[str, Any]:
    """The output config: the donor's, with depth, per-layer lists and dtype made true.

    `layer_sources` gives, per output layer, the config of the model it comes from and its index
    there. Per-layer keys (`layer_types`, sliding-window placement) travel with the layer:
    a sliding-attention block stays sliding wherever it lands.
    """
    found = spec(donor, "config.json")
    out = dict(donor)
    depth = len(layer_sources)
    out["num_hidden_layers"] = depth
    for layer_key in found.layer_keys:
        if layer_key.name in donor:
            out[layer_key.name] = [_per_layer(cfg, layer_key, i) for cfg, i in layer_sources]
    if found.first_sliding_key is not None and found.first_sliding_key in donor:
        # Layers from this index on slide: keep that boundary where the layer types put it.
        types = out.get(LAYER_TYPES.name) or []
        first_sliding = next((i for i, t in enumerate(types) if t == "sliding_attention"), None)
        out[found.first_sliding_key] = depth if first_sliding is None else first_sliding
    # transformers 5 reads `dtype`; an older spelling the donor carries is made true as well.
    out.update({key: dtype_name for key in DTYPE_KEYS if key == "dtype" or key in out})
    return out


def _per_layer(config: dict[str, Any], key: LayerKey, index: int) -> str:
    values = config.get(key.name)
    if values and index < len(values):
        return str(values[index])
    return key.default


#: Any spec, for the module-level helpers: `_shared` guarantees they all agree on the layout.
_ANY = next(iter(SPECS.values()))
