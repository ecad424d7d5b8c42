"""Pydantic models of every merge config, validated before any model is opened.

`passthrough` accepts mergekit's YAML as users already write it (slices, sources, layer_range,
scale parameters with mergekit's lookup rules); the other methods are hubmerge's own. Every
model forbids unknown keys, so a typo is an error naming the key instead of a silent default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    model_validator,
)

from hubmerge.errors import ConfigError

_TYPE_TAGS = frozenset({"float", "int", "str", "bool", "list", "dict"})

DType = Literal["float32", "float16", "bfloat16", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Gradient = Annotated[list[float], Field(min_length=1)]


class ScaleRule(_Strict):
    """One entry of a filtered scale list: the first rule whose filter matches wins."""

    filter: str | None = None
    value: float | Gradient


#: mergekit's forms: a number, a gradient interpolated over the slice, or filtered rules.
ScaleSetting = float | Gradient | Annotated[list[ScaleRule], Field(min_length=1)]


class Parameters(_Strict):
    scale: ScaleSetting | None = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _range_order(self) -> InputSlice:
        start, end = self.layer_range
        if start < 0 or end < start:
            raise ValueError(f"layer_range [{start}, {end}] must satisfy 0 <= start <= end")
        return self


class OutputSlice(_Strict):
    sources: Annotated[list[InputSlice], Field(min_length=1, max_length=1)]
    parameters: Parameters | None = None


class HubSettings(_Strict):
    """`hub:`: where `hubmerge run`/`publish` put the model, and metadata for its card."""

    repo_id: Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+$")] | None = None
    private: bool = False
    #: An SPDX-style Hub license id; without it the card inherits the donors' common license.
    license: str | None = None
    tags: list[str] = []
    language: str | list[str] | None = None


class CardSettings(_Strict):
    """`card:`: what the model card says beyond what hubmerge derives from the merge."""

    title: str | None = None
    summary: str | None = None
    tags: list[str] = []
    #: A Jinja2 template replacing hubmerge's default card (`hubmerge card --template` wins).
    template: str | None = None


class _MergeConfig(_Strict):
    dtype: DType | None = None
    out_dtype: DType | None = None
    hub: HubSettings | None = None
    card: CardSettings | None = None


def _not_union(value: str | None) -> str | None:
    if value == "union":
        raise ValueError("union is not supported (use base or a model)")
    return value


#: mergekit's `tokenizer_source`: `base` or a model; `union` would need vocabulary merging.
TokenizerSource = Annotated[str | None, AfterValidator(_not_union)]


def _sliced_models(
    base_model: str | None, slices: list[Any], tokenizer_source: str | None
) -> list[str]:
    """Every model a slice-based (mergekit) config reads, base first, each once."""
    refs = [base_model] if base_model else []
    refs += [source.model for s in slices for source in s.sources]
    if tokenizer_source and tokenizer_source != "base":
        refs.append(tokenizer_source)
    return list(dict.fromkeys(refs))


class PassthroughConfig(_MergeConfig):
    """mergekit's `passthrough`: stack layer ranges of models, optionally scaling tensors."""

    merge_method: Literal["passthrough"]
    slices: Annotated[list[OutputSlice], Field(min_length=1)]
    base_model: str | None = None
    tokenizer_source: TokenizerSource = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _empty_slices_only_at_edges(self) -> PassthroughConfig:
        # A zero-width slice is how mergekit picks the embedding or head donor: it is only
        # meaningful first or last, and a config of nothing but such slices has no layers.
        for i, s in enumerate(self.slices):
            start, end = s.sources[0].layer_range
            if start == end and 0 < i < len(self.slices) - 1:
                raise ValueError(f"slices[{i}]: layer_range [{start}, {end}] is empty")
        if all(s.sources[0].layer_range[0] == s.sources[0].layer_range[1] for s in self.slices):
            raise ValueError("every layer_range is empty: the merge would have no layers")
        return self

    def referenced_models(self) -> list[str]:
        return _sliced_models(self.base_model, self.slices, self.tokenizer_source)


class BlockExpansionConfig(_MergeConfig):
    """LLaMA Pro block expansion: copies of layers whose output projections are zeroed."""

    merge_method: Literal["block_expansion"]
    model: str
    interleave: PositiveInt | None = None
    append: PositiveInt | None = None
    zero: Annotated[list[str], Field(min_length=1)] = ["o_proj", "down_proj"]

    @model_validator(mode="after")
    def _one_pattern(self) -> BlockExpansionConfig:
        if (self.interleave is None) == (self.append is None):
            raise ValueError("give exactly one of interleave: N or append: K")
        return self

    def referenced_models(self) -> list[str]:
        return [self.model]


class OlmDataset(_Strict):
    mode: Literal["exact", "bigram", "quality"]
    #: Overrides the top-level `samples` for this dataset.
    samples: PositiveInt | None = None


class ExactLimits(_Strict):
    #: None: the longest reference answer (in tokens) plus a small margin.
    max_new_tokens: PositiveInt | None = None


class QualityLimits(_Strict):
    max_new_tokens: PositiveInt = 512
    min_words: PositiveInt = 100
    target_words: PositiveInt = 2048


class OlmLimits(_Strict):
    exact: ExactLimits = ExactLimits()
    quality: QualityLimits = QualityLimits()


class OlmConfig(_MergeConfig):
    """OLM: greedy, evaluation-driven choice of each layer from a pool of same-shape models."""

    merge_method: Literal["olm"]
    models: Annotated[list[str], Field(min_length=1)]
    dataset: Annotated[dict[str, OlmDataset], Field(min_length=1)]
    base_model: str | None = None
    direction: Literal["forward", "backward"] = "backward"
    samples: PositiveInt = 200
    limits: OlmLimits = OlmLimits()
    aggregate: Literal["rank_mean", "copeland"] = "rank_mean"
    device: str | None = None
    batch_size: PositiveInt = 32
    seed: int = 0

    def referenced_models(self) -> list[str]:
        return list(dict.fromkeys(([self.base_model] if self.base_model else []) + self.models))


class NerConfig(_MergeConfig):
    """NER: each layer (or module) from the model whose weights have the highest NER."""

    merge_method: Literal["ner"]
    base_model: str
    #: The candidates; the base model is always one of them.
    models: Annotated[list[str], Field(min_length=1)]
    granularity: Literal["layer", "module"] = "layer"
    #: `minmax` rescales each matrix to [0, 1] first, as the public implementation does.
    normalize: Literal["none", "minmax"] = "none"
    #: `ner` chooses the embeddings and the head by NER too (never split when they are tied).
    embeddings: Literal["base", "ner"] = "base"

    def referenced_models(self) -> list[str]:
        return list(dict.fromkeys([self.base_model, *self.models]))


class LinearParameters(_Strict):
    weight: ScaleSetting | None = None
    normalize: bool | None = None


class LinearSource(InputSlice):
    parameters: LinearParameters | None = None  # type: ignore[assignment]


class LinearSlice(_Strict):
    sources: Annotated[list[LinearSource], Field(min_length=1)]
    parameters: LinearParameters | None = None

    @model_validator(mode="after")
    def _equal_ranges(self) -> LinearSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("every source of a slice must span the same number of layers")
        if lengths == {0}:
            raise ValueError("layer_range is empty")
        models = [s.model for s in self.sources]
        if len(set(models)) < len(models):
            raise ValueError("a model is listed twice in one slice")
        return self


class LinearConfig(_MergeConfig):
    """mergekit's `linear` where every tensor is a selection: one source weighted 1, others 0.

    That is the form module-by-module plans take as a mergekit recipe (passthrough cannot take
    single tensors from other models), and mergekit computes it exactly. True weighted averages
    are refused when the plan is made.
    """

    merge_method: Literal["linear"]
    slices: Annotated[list[LinearSlice], Field(min_length=1)]
    base_model: str | None = None
    tokenizer_source: TokenizerSource = None
    parameters: LinearParameters | None = None

    def referenced_models(self) -> list[str]:
        return _sliced_models(self.base_model, self.slices, self.tokenizer_source)


MergeConfig = PassthroughConfig | BlockExpansionConfig | OlmConfig | NerConfig | LinearConfig
METHODS: dict[str, type[MergeConfig]] = {
    "passthrough": PassthroughConfig,
    "block_expansion": BlockExpansionConfig,
    "olm": OlmConfig,
    "ner": NerConfig,
    "linear": LinearConfig,
}


def parse_config(data: Any, where: str) -> MergeConfig:
    """Validate a config mapping; errors name `where` and the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    method = data.get("merge_method")
    if method is None:
        raise ConfigError(f"{where}: missing key merge_method (one of: {', '.join(METHODS)})")
    if method not in METHODS:
        raise ConfigError(
            f"{where}: merge_method: unknown method {method!r} (one of: {', '.join(METHODS)})"
        )
    try:
        return METHODS[method].model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None


def load_config(path: Path) -> MergeConfig:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    return loads_config(text, str(path))


def loads_config(text: str, where: str) -> MergeConfig:
    """Validate a config given as YAML text (the Space's editor); errors name `where`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{line}: {problem}") from None
    return parse_config(data, where)


def _describe(error: ValidationError) -> str:
    """One line for the most telling validation error: `slices[0].sources[0].layer_range: ...`.

    An unknown key is reported before anything else, since a misspelt key also makes the
    intended one "missing"; the missing name, if close, is offered as the fix.
    """
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        key, parent = str(first["loc"][-1]), first["loc"][:-1]
        missing = [
            str(e["loc"][-1]) for e in errors if e["type"] == "missing" and e["loc"][:-1] == parent
        ]
        close = difflib.get_close_matches(key, missing, n=1)
        message = "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
    path = _loc(first["loc"])
    return f"{path}: {message}" if path else message


def _loc(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or part[:1].isupper() or "[" in part or "-" in part:
            continue  # pydantic's union-member tags ('float', 'list[float]'), not config keys
        elif part.isidentifier():
            path += f".{part}" if path else part
        else:
            path += f"[{part!r}]"
    return path
