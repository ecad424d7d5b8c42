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
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from hubmerge import arch
from hubmerge.errors import ConfigError, quoted
from hubmerge.limits import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    MAX_GRADIENT,
    MAX_LAYERS,
    MAX_SCALE,
)

_TYPE_TAGS = frozenset({"float", "int", "str", "bool", "list", "dict"})

DType = Literal["float32", "float16", "bfloat16", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if not value.isprintable():
        raise ValueError("must not contain line breaks or control characters")
    return value


#: A name that means something (a model, a tensor filter): an empty one would match everything
#: (`zero: ['']` zeroes every tensor) or name the current folder (`model: ''`).
Text = Annotated[str, AfterValidator(_plain_text)]
#: A number of layers or a layer index: an integer (`true` is not 1), within `MAX_LAYERS`.
LayerCount = Annotated[int, Field(strict=True, ge=0, le=MAX_LAYERS)]
PositiveLayerCount = Annotated[int, Field(strict=True, gt=0, le=MAX_LAYERS)]
#: A scale or weight: finite, and finite in the float32 arithmetic it is applied in.
Scale = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_SCALE, le=MAX_SCALE)]
Gradient = Annotated[list[Scale], Field(min_length=1, max_length=MAX_GRADIENT)]


class ScaleRule(_Strict):
    """One entry of a filtered scale list: the first rule whose filter matches wins."""

    filter: Text | None = None
    value: Scale | Gradient


#: mergekit's forms: a number, a gradient interpolated over the slice, or filtered rules.
ScaleSetting = Scale | Gradient | Annotated[list[ScaleRule], Field(min_length=1)]


class Parameters(_Strict):
    scale: ScaleSetting | None = None


class InputSlice(_Strict):
    model: Text
    layer_range: tuple[LayerCount, LayerCount]
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


def _check_depth(slices: list[Any]) -> None:
    """A slice-based config's output must be a model's size (see `hubmerge.limits`)."""
    depth = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)
    if depth > MAX_LAYERS:
        raise ValueError(f"the slices add up to {depth:,} layers, over {MAX_LAYERS:,}")


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
    base_model: Text | None = None
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
        _check_depth(self.slices)
        return self

    def referenced_models(self) -> list[str]:
        return _sliced_models(self.base_model, self.slices, self.tokenizer_source)


class BlockExpansionConfig(_MergeConfig):
    """LLaMA Pro block expansion: copies of layers whose output projections are zeroed."""

    merge_method: Literal["block_expansion"]
    model: Text
    interleave: PositiveLayerCount | None = None
    append: PositiveLayerCount | None = None
    #: Every supported architecture names its residual-output modules the same (`arch.SPECS`).
    zero: Annotated[list[Text], Field(min_length=1)] = list(arch.RESIDUAL_OUTPUTS)

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


class OlmAcceptance(_Strict):
    """When a better-scoring candidate replaces the current layer (see `scoring.sign_test`)."""

    #: `sign`: only when a one-sided paired sign test on the per-sample results says the gain
    #: is unlikely (p <= alpha) to be the selection samples' noise; `none`: any gain.
    test: Literal["none", "sign"] = "none"
    alpha: Annotated[float, Field(gt=0, le=1)] = 0.05
    #: And only when it is better than the current layer on this many more samples than worse.
    min_gain: NonNegativeInt = 0


class OlmConfig(_MergeConfig):
    """OLM: greedy, evaluation-driven choice of each layer from a pool of same-shape models."""

    merge_method: Literal["olm"]
    models: Annotated[list[Text], Field(min_length=1)]
    dataset: Annotated[dict[str, OlmDataset], Field(min_length=1)]
    base_model: str | None = None
    direction: Literal["forward", "backward"] = "backward"
    samples: PositiveInt = 200
    limits: OlmLimits = OlmLimits()
    aggregate: Literal["rank_mean", "copeland", "mean"] = "rank_mean"
    #: What is tried at each position: every pool model's layer (`layers`), the element-wise
    #: mean of the pool's layers (`mean`), and base + lam x sum(model - base) for each lam of
    #: `lambdas` (`task_arithmetic`); the whole-model blends join the starting-model choice.
    candidates: Annotated[
        list[Literal["layers", "mean", "task_arithmetic"]], Field(min_length=1)
    ] = ["layers"]
    lambdas: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = [0.5]
    #: The model task arithmetic is relative to (the donors' parent); default: `base_model`,
    #: else the first of `models`.
    blend_base: str | None = None
    #: `module`: a position's attention and MLP are chosen separately.
    granularity: Literal["layer", "module"] = "layer"
    acceptance: OlmAcceptance = OlmAcceptance()
    device: str | None = None
    #: Score a position's candidates in parallel, one worker process per entry, each with its
    #: own working model on that device (`[cuda:0, cuda:1]`); same decisions as one device.
    devices: Annotated[list[Text], Field(min_length=1)] | None = None
    #: Worker processes on `device` (or the CPU) when `devices` is not given.
    workers: PositiveInt = 1
    batch_size: PositiveInt = 32
    seed: int = 0

    @model_validator(mode="after")
    def _one_way_to_parallel(self) -> OlmConfig:
        if self.devices is not None:
            if self.workers != 1 and self.workers != len(self.devices):
                raise ValueError("workers: give devices (one worker each) or workers, not both")
            if "auto" in self.devices:
                raise ValueError("devices: 'auto' spreads one model; it cannot be a worker's")
        return self

    def worker_devices(self, device: str | None) -> list[str] | None:
        """Where each worker runs (None: no workers, the search runs in this process)."""
        if self.devices is not None:
            return list(self.devices)
        if self.workers > 1:
            return [device or self.device or "cpu"] * self.workers
        return None

    def referenced_models(self) -> list[str]:
        return list(dict.fromkeys(([self.base_model] if self.base_model else []) + self.models))


class NerConfig(_MergeConfig):
    """NER: each layer (or module) from the model whose weights have the highest NER."""

    merge_method: Literal["ner"]
    base_model: Text
    #: The candidates; the base model is always one of them.
    models: Annotated[list[Text], Field(min_length=1)]
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
    """mergekit's `linear` as hubmerge plans it: selections, and plain weighted sums.

    A selection (one source weighted 1, others 0) is the form module-by-module plans take as a
    mergekit recipe (passthrough cannot take single tensors from other models); with
    `normalize: false` and constant weights any weights are a plain sum (OLM's blended layers).
    mergekit computes both exactly as hubmerge does; other weighted averages are mergekit's
    (`MergekitConfig`).
    """

    merge_method: Literal["linear"]
    slices: Annotated[list[LinearSlice], Field(min_length=1)]
    base_model: Text | None = None
    tokenizer_source: TokenizerSource = None
    parameters: LinearParameters | None = None

    @model_validator(mode="after")
    def _bounded(self) -> LinearConfig:
        _check_depth(self.slices)
        return self

    def referenced_models(self) -> list[str]:
        return _sliced_models(self.base_model, self.slices, self.tokenizer_source)


class MergekitConfig(_MergeConfig):
    """Any method hubmerge does not plan itself (slerp, ties, task_arithmetic, a weighted linear,
    ...): mergekit computes the weights (hubmerge.methods.mergekit_run).

    Only hubmerge's own sections (`hub:`, `card:`, the dtypes) are checked here; every other key
    is mergekit's, kept as given (`model_extra`) and validated against mergekit's own models and
    method registry before a merge (`mergekit_run.validate`). Reading a merged model's recorded
    config (its card, CI) therefore needs no mergekit.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    merge_method: str

    def mergekit_data(self) -> dict[str, Any]:
        """The config as mergekit reads it: everything but hubmerge's `hub:` and `card:`.

        `merge_method` first and the dtypes last, as mergekit configs are usually written (the
        model's own fields come before the extras, whose order is the user's).
        """
        data = self.model_dump(mode="json", exclude={"hub", "card"}, exclude_none=True)
        last: dict[str, Any] = {k: data.pop(k) for k in ("dtype", "out_dtype") if k in data}
        return {"merge_method": data.pop("merge_method"), **data, **last}

    def referenced_models(self) -> list[str]:
        """Every model mergekit reads, base first, each once (LoRA suffixes `+...` included)."""
        data = self.mergekit_data()
        refs = [data.get("base_model")]
        groups = [data, *(m for m in (data.get("modules") or {}).values() if isinstance(m, dict))]
        for group in groups:
            refs += [m.get("model") for m in group.get("models") or [] if isinstance(m, dict)]
            for s in group.get("slices") or []:
                if isinstance(s, dict):
                    refs.append(s.get("base_model"))
                    refs += [x.get("model") for x in s.get("sources") or [] if isinstance(x, dict)]
        tokenizer = data.get("tokenizer_source")
        refs.append(None if tokenizer in ("base", "union") else tokenizer)
        return list(dict.fromkeys(r for r in refs if isinstance(r, str)))


def _weighted_linear(data: dict[str, Any]) -> bool:
    """Whether a `linear` config is a true weighted average rather than a 0/1 selection.

    Top-level `models:` is mergekit's model-wise form, which hubmerge's selection planner does
    not read; otherwise any weight other than 0 or 1, or a gradient between values, is a blend.
    """
    if "models" in data:
        return True

    def blend(setting: Any) -> bool:
        if isinstance(setting, bool):
            return False
        if isinstance(setting, int | float):
            return setting not in (0, 1)
        if isinstance(setting, dict):
            return blend(setting.get("value"))
        if isinstance(setting, list):
            numbers = [v for v in setting if isinstance(v, int | float)]
            if numbers and len(set(numbers)) > 1:
                return True  # a gradient between two values passes through the ones between
            return any(blend(v) for v in setting)
        return False

    levels = [data, *(s for s in data.get("slices") or [] if isinstance(s, dict))]
    levels += [x for s in levels[1:] for x in s.get("sources") or [] if isinstance(x, dict)]
    return any(
        isinstance(level.get("parameters"), dict) and blend(level["parameters"].get("weight"))
        for level in levels
    )


def _plain_sum(data: dict[str, Any]) -> bool:
    """Whether a weighted `linear` config is a plain weighted sum hubmerge computes itself, bit
    for bit as mergekit does (`tensorfile.weighted_sum`): `normalize: false` (no division to
    round), slices (not `models:`), constant weights (no gradients to interpolate). That is the
    form of hubmerge's own recipes for blended layers (OLM's mean and task-arithmetic layers).
    """
    parameters = data.get("parameters")
    if "models" in data or not isinstance(parameters, dict):
        return False
    if parameters.get("normalize") is not False:
        return False

    def constant(setting: Any) -> bool:
        if isinstance(setting, list):
            return all(isinstance(v, dict) and isinstance(v.get("value"), int | float)
                       for v in setting)  # fmt: skip
        return setting is None or isinstance(setting, int | float)

    levels = [data, *(s for s in data.get("slices") or [] if isinstance(s, dict))]
    levels += [x for s in levels[1:] for x in s.get("sources") or [] if isinstance(x, dict)]
    return all(
        constant(level["parameters"].get("weight"))
        for level in levels
        if isinstance(level.get("parameters"), dict)
    )


MergeConfig = (
    PassthroughConfig | BlockExpansionConfig | OlmConfig | NerConfig | LinearConfig | MergekitConfig
)


def parse_config(data: Any, where: str) -> MergeConfig:
    """Validate a config mapping; errors name `where` and the offending key.

    `merge_method` chooses the config model from the method registry (`hubmerge.methods`).
    """
    # Imported here: the registry's methods are built on the config models of this module.
    from hubmerge import methods

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    _check_size(data, where)
    method = data.get("merge_method")
    if method is None:
        names = ", ".join(methods.NAMES)
        raise ConfigError(f"{where}: missing key merge_method (one of: {names})")
    if not isinstance(method, str):
        raise ConfigError(f"{where}: merge_method: expected a method name, got {quoted(method)}")
    # Any other name is mergekit's to know (or refuse): `mergekit_run.validate`, before a merge.
    model: type[MergeConfig] = methods.get(method).config
    if method == "linear" and _weighted_linear(data) and not _plain_sum(data):
        model = MergekitConfig  # a real weighted average: mergekit's, not a selection
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None


def load_config(path: Path) -> MergeConfig:
    """Read and validate a YAML config file (UTF-8, at most `MAX_CONFIG_BYTES`)."""
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return loads_config(text, str(path))


def loads_config(text: str, where: str) -> MergeConfig:
    """Validate a config given as YAML text (the Space's editor); errors name `where`."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: over {MAX_CONFIG_BYTES:,} characters, more than a config")
    try:
        _check_depth_of(text, where)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{line}: {problem}") from None
    except RecursionError:
        raise _too_deep(where) from None
    except ValueError as e:  # a value YAML reads but Python cannot hold (a 5,000-digit integer)
        raise ConfigError(f"{where}: invalid YAML: {str(e).splitlines()[0][:80]}") from None
    return parse_config(data, where)


def _check_depth_of(text: str, where: str) -> None:
    """Refuse YAML nested beyond `MAX_CONFIG_DEPTH` from its event stream (parsed without
    recursion, by libyaml where PyYAML has it: the Python parser takes a second on deep flow
    nesting), before the recursive composer spends seconds and the stack on it.
    """
    depth = 0
    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise _too_deep(where)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return  # invalid YAML: `safe_load` says where, as it always has


def _too_deep(where: str) -> ConfigError:
    return ConfigError(f"{where}: nested too deeply (at most {MAX_CONFIG_DEPTH} levels)")


def _check_size(data: Any, where: str) -> None:
    """Refuse a config too deep or too large once YAML aliases are expanded (a few lines of
    aliases can stand for billions of values), before validation walks it.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: over {MAX_CONFIG_NODES:,} values (with aliases expanded)")
        if depth > MAX_CONFIG_DEPTH:
            raise _too_deep(where)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _describe(error: ValidationError) -> str:
    """One line for the most telling validation error: `slices[0].sources[0].layer_range: ...`.

    An unknown key is reported before anything else, since a misspelt key also makes the
    intended one "missing"; the missing name, if close, is offered as the fix.
    """
    errors = error.errors()
    # Of a union's alternatives, the deepest error is the telling one: a rule's `filter`, not
    # "scale should be a number" from the alternative the value was never meant to be.
    deepest = max(errors, key=lambda e: len(e["loc"]))
    first = next((e for e in errors if e["type"] == "extra_forbidden"), deepest)
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
