"""mergekit's weight-merging methods (slerp, ties, dare_ties, task_arithmetic, ...), run by it.

hubmerge plans passthrough, 0/1 `linear`, block expansion, NER and OLM itself; every other method
in mergekit's registry is computed by mergekit (the field's reference implementation, an optional
dependency: `pip install "hubmerge[mergekit]"`), through its Python API, into hubmerge's staging
folder. This module is the whole bridge:

- `validate`: the config against mergekit's own pydantic models and method registry (unknown keys
  and parameters too, which mergekit itself ignores), as one-line `ConfigError`s.
- `plan`: the merge's lineage as a `MergePlan` (which models, which one gives the config and
  tokenizer, the output depth). Its layers name the model each layer's position is read from;
  the tensors themselves are mergekit's blend of every model, which the card says.
- `write`: `mergekit.merge.run_merge` on the models hubmerge opened (their local folders, so
  mergekit reads exactly the files hubmerge validated and recorded), with the output config
  made true for transformers 5 where the depth changes (`layer_types`); it returns the
  `MergekitReport`, the method's facts for the card.
- `recipe`: the config as given, with Hub models pinned to the commits read.
- `parameter_tables`: the method's parameters per model and slice, for the card and the CLI;
  `card_section` is the card's `mergekit` section.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from hubmerge import arch
from hubmerge.config import MergekitConfig, _describe
from hubmerge.errors import ConfigError, SourceError
from hubmerge.folder import MergekitReport, read_report
from hubmerge.methods import NAMES
from hubmerge.methods.base import CardInputs, Method, Reporter
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan
from hubmerge.recipe import MODEL_KEYS, pin_models
from hubmerge.sources import ModelSource

INSTALL = "pip install 'hubmerge[mergekit]'"
#: mergekit's random methods (DARE, DELLA) are seeded, so the recipe rebuilds the same weights:
#: `mergekit-yaml mergekit_config.yml OUT --random-seed 0` gives the same model.
RANDOM_SEED = 0
#: Held while mergekit's output-config function is replaced (`_output_config`).
_PATCH_LOCK = threading.Lock()


def _registry() -> Any:
    """mergekit's method registry; None when mergekit is not installed."""
    try:
        from mergekit.merge_methods import registry
    except ImportError:
        return None
    return registry


def _specs() -> dict[str, Any]:
    """Every method mergekit registers, by name: its parameters, pretty name and paper."""
    return {m.spec.name: m.spec for m in _registry().registered_methods()}


def validate(config: MergekitConfig, where: str) -> None:
    """Check `config` as mergekit would, before any model is opened; errors name the key."""
    registry = _registry()
    method = config.merge_method
    if registry is None:
        raise ConfigError(
            f"{where}: merge_method: {method!r} is not one of hubmerge's own methods "
            f"({', '.join(NAMES)}); mergekit's methods need mergekit: {INSTALL}"
        )
    specs = _specs()
    if method not in specs:
        names = list(dict.fromkeys([*NAMES, *specs]))
        raise ConfigError(
            f"{where}: merge_method: unknown method {method!r} (one of: {', '.join(names)})"
        )
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    data = config.mergekit_data()
    unknown = _unknown_key(MergeConfiguration, data, ())
    if unknown:
        raise ConfigError(f"{where}: {unknown}")
    try:
        MergeConfiguration.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None
    except (RuntimeError, ValueError, TypeError) as e:  # mergekit's own validators raise these
        raise ConfigError(f"{where}: {_first_line(e)}") from None
    _check_parameters(specs[method], data, where)


def _unknown_key(model: Any, data: Any, loc: tuple[str, ...]) -> str | None:
    """The first key of `data` that no field of pydantic `model` (recursively) takes, described.

    mergekit's models ignore unknown keys; hubmerge's rule is that a typo is an error.
    """
    if not isinstance(data, dict):
        return None
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"{_path((*loc, str(key)))}: unknown key{hint}"
        if key == "parameters":
            continue  # a method's parameters: checked against its spec (`_check_parameters`)
        inner = _model_in(fields[key].annotation)
        if inner is None:
            continue
        # A model, a list of them (`slices[0]`), or a mapping of them (`modules.NAME`).
        items: list[tuple[tuple[str, ...], Any]]
        if isinstance(value, dict) and _is_mapping(fields[key].annotation):
            items = [((key, str(k)), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [((f"{key}[{i}]",), v) for i, v in enumerate(value)]
        else:
            items = [((key,), value)]
        for part, item in items:
            found = _unknown_key(inner, item, (*loc, *part))
            if found:
                return found
    return None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation (`Optional[List[Model]]` -> `Model`), if any."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return False


def _path(loc: tuple[str, ...]) -> str:
    return ".".join(loc).replace(".[", "[")


def _levels(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every `parameters:` mapping in a mergekit config, with where it is."""
    levels: list[tuple[str, Any]] = [("parameters", data.get("parameters"))]
    groups: list[tuple[str, Any]] = [("", data)]
    groups += [(f"modules.{k}.", m) for k, m in (data.get("modules") or {}).items()]
    for prefix, group in groups:
        if prefix:
            levels.append((f"{prefix}parameters", group.get("parameters")))
        for i, m in enumerate(group.get("models") or []):
            levels.append((f"{prefix}models[{i}].parameters", m.get("parameters")))
        for i, s in enumerate(group.get("slices") or []):
            levels.append((f"{prefix}slices[{i}].parameters", s.get("parameters")))
            for j, source in enumerate(s.get("sources") or []):
                levels.append(
                    (f"{prefix}slices[{i}].sources[{j}].parameters", source.get("parameters"))
                )
    return [(where, p) for where, p in levels if p]


def _check_parameters(spec: Any, data: dict[str, Any], where: str) -> None:
    """Every parameter named is one the method takes, and each it requires is given somewhere."""
    names = [p.name for p in spec.parameters]
    given: set[str] = set()
    for loc, parameters in _levels(data):
        for key in parameters:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                takes = ", ".join(names) or "none"
                raise ConfigError(
                    f"{where}: {loc}.{key}: unknown parameter of {spec.name} "
                    f"({hint}it takes: {takes})"
                )
            given.add(key)
    missing = [p.name for p in spec.parameters if p.required and p.name not in given]
    if missing:
        raise ConfigError(f"{where}: parameters.{missing[0]}: required by {spec.name}, not given")


def plan(config: MergekitConfig, sources: Mapping[str, ModelSource]) -> MergePlan:
    """The merge's lineage: its models, its config/tokenizer donor and its depth.

    Each output layer names the model its position is read from (the slice's base model, else its
    first source); every model of the slice is blended into it by mergekit.
    """
    data = config.mergekit_data()
    models = config.referenced_models()
    donor = data.get("base_model") or models[0]
    tokenizer = data.get("tokenizer_source")
    tokenizer = tokenizer if isinstance(tokenizer, str) and tokenizer in sources else donor
    return MergePlan(
        method=config.merge_method,
        layers=[LayerPlan(ref, index) for ref, index in _layer_sources(data, donor, sources)],
        embed=EdgePlan(donor),
        head=EdgePlan(donor),
        donor=donor,
        tokenizer=tokenizer,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=models,
    )


def _layer_sources(
    data: dict[str, Any], donor: str, sources: Mapping[str, ModelSource]
) -> list[tuple[str, int]]:
    if not data.get("slices"):
        return [(donor, i) for i in range(sources[donor].num_layers)]
    layers = []
    for s in data["slices"]:
        refs = [x["model"] for x in s["sources"]]
        base = s.get("base_model") or data.get("base_model")
        source = s["sources"][refs.index(base)] if base in refs else s["sources"][0]
        start, end = source["layer_range"]
        layers += [(source["model"], i) for i in range(start, end)]
    return layers


def recipe(config: MergekitConfig, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    """The config as given (less `hub:` and `card:`), Hub models pinned to the commits read."""
    return pin_models(config.mergekit_data(), sources)


def write(
    config: MergekitConfig,
    merge_plan: MergePlan,
    sources: Mapping[str, ModelSource],
    out_dir: Path,
    *,
    shard_size: int,
    device: str | None = None,
    allow_pickle: bool = False,
    reporter: Reporter | None = None,
) -> tuple[MergekitReport]:
    """Run mergekit into `out_dir` (an empty staging folder); the report of the method it ran.

    mergekit reads the local folders hubmerge opened (Hub models from the snapshots that were
    downloaded and recorded), never remote code. On an accelerator, results stay there until
    written (`low_cpu_memory`), so host memory holds only the tensors being read.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if reporter:
        reporter.log(f"mergekit computes the {config.merge_method} merge")
    local = _localised(config.mergekit_data(), sources)
    cuda = bool(device) and str(device).startswith("cuda")
    options = MergeOptions(
        trust_remote_code=False,
        lazy_unpickle=allow_pickle,
        cuda=cuda,
        device=device or "cpu",
        low_cpu_memory=cuda,
        out_shard_size=shard_size,
        copy_tokenizer=True,
        write_model_card=False,
        random_seed=RANDOM_SEED,
        quiet=True,
    )
    merge_config = MergeConfiguration.model_validate(local)
    try:
        with _output_config(merge_config, merge_plan, sources):
            run_merge(merge_config, str(out_dir), options=options)
    except Exception as e:  # noqa: BLE001 - mergekit raises many types for what it cannot merge
        message = _first_line(e)
        for source in sources.values():  # paths hubmerge gave mergekit: say the user's names
            message = message.replace(str(source.path), source.name)
        raise SourceError(f"mergekit {config.merge_method}: {message}") from None
    spec = _specs()[config.merge_method]
    report = MergekitReport(
        method=spec.name,
        name=spec.pretty_name or spec.name,
        reference_url=spec.reference_url,
        mergekit_version=metadata.version("mergekit"),
        random_seed=RANDOM_SEED,
    )
    return (report,)


def card_section(inputs: CardInputs) -> dict[str, Any] | None:
    """The card's `mergekit` section: the method mergekit ran (its name and paper, from
    mergekit's registry) and its parameters; None when mergekit did not compute the weights."""
    report = read_report(inputs.folder, MergekitReport)
    if report is None:
        return None
    return {
        "name": report.name,
        "url": report.reference_url,
        "version": report.mergekit_version,
        "random_seed": report.random_seed,
        "tables": parameter_tables(inputs.names.public(dict(inputs.config_data))),
    }


def _localised(data: Any, sources: Mapping[str, ModelSource]) -> Any:
    """`data` with every model reference replaced by the local folder hubmerge opened for it."""
    if isinstance(data, list):
        return [_localised(item, sources) for item in data]
    if not isinstance(data, dict):
        return data
    return {
        k: str(sources[v].path)
        if k in MODEL_KEYS and isinstance(v, str) and v in sources
        else _localised(v, sources)
        for k, v in data.items()
    }


@contextlib.contextmanager
def _output_config(
    merge_config: Any, merge_plan: MergePlan, sources: Mapping[str, ModelSource]
) -> Iterator[None]:
    """Give mergekit the output config when the merge changes the depth.

    mergekit sets `num_hidden_layers` on the donor's transformers config, which transformers 5
    refuses when `layer_types` then disagree (Qwen2, Qwen3, Gemma): the merge fails before a
    tensor is written. For this merge only (other threads' merges go to mergekit's own code),
    mergekit gets hubmerge's rewrite, where each layer's type travels with it.
    """
    donor = sources[merge_plan.donor]
    if len(merge_plan.layers) == donor.num_layers:
        yield
        return
    import mergekit.merge
    from transformers import AutoConfig

    dtype = merge_plan.out_dtype or merge_plan.dtype or donor.config.get("dtype") or "float32"
    layer_sources = [(sources[layer.model].config, layer.layer) for layer in merge_plan.layers]
    fixed = arch.rewrite_config(donor.config, layer_sources, str(dtype))
    with _PATCH_LOCK:
        original = mergekit.merge._model_out_config

        def out_config(config: Any, *args: Any, **kwargs: Any) -> Any:
            if config is not merge_config:
                return original(config, *args, **kwargs)
            return AutoConfig.for_model(**fixed)

        mergekit.merge._model_out_config = out_config
        try:
            yield
        finally:
            mergekit.merge._model_out_config = original


def parameter_tables(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The method's parameters as tables: top level, then per model or per slice and source.

    Each table is `{"title", "columns", "rows"}` with every cell a string; a value shows as
    mergekit reads it: a number, a gradient `[0, 0.5, 1]`, or filters `self_attn: [..]; *: 0.5`.
    `data` is the config (with names fit to publish, on a card).
    """
    tables: list[dict[str, Any]] = []
    top = data.get("parameters") or {}
    if top:
        tables.append(
            {
                "title": "All tensors",
                "columns": ["Parameter", "Value"],
                "rows": [[k, setting_text(v)] for k, v in top.items()],
            }
        )
    base = data.get("base_model")
    if data.get("models"):
        entries = [(m["model"], None, m.get("parameters") or {}) for m in data["models"]]
        if base and base not in [m for m, _, _ in entries]:
            entries.insert(0, (base, None, {}))
        tables.append(_table("Models", entries, base))
    for i, s in enumerate(data.get("slices") or []):
        entries = [
            (x["model"], x.get("layer_range"), x.get("parameters") or {}) for x in s["sources"]
        ]
        title = f"Slice {i}" + (
            f" (slice parameters: {_inline(s['parameters'])})" if s.get("parameters") else ""
        )
        tables.append(_table(title, entries, s.get("base_model") or base))
    return tables


def _table(title: str, entries: list[tuple[str, Any, dict[str, Any]]], base: Any) -> dict[str, Any]:
    names = list(dict.fromkeys(k for _, _, parameters in entries for k in parameters))
    ranged = any(r is not None for _, r, _ in entries)
    rows = []
    for model, layer_range, parameters in entries:
        row = [f"{model} (base)" if model == base else model]
        if ranged:
            row.append(f"{layer_range[0]}-{layer_range[1] - 1}" if layer_range else "-")
        row += [setting_text(parameters[n]) if n in parameters else "-" for n in names]
        rows.append(row)
    columns = ["Model", *(["Layers"] if ranged else []), *names]
    return {"title": title, "columns": columns, "rows": rows}


def _inline(parameters: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {setting_text(v)}" for k, v in parameters.items())


def setting_text(setting: Any) -> str:
    """One parameter setting as mergekit reads it, in one line."""
    if isinstance(setting, bool) or not isinstance(setting, int | float | list | dict):
        return str(setting)
    if isinstance(setting, int | float):
        return f"{setting:g}"
    if isinstance(setting, dict):
        setting = [setting]
    if all(isinstance(v, dict) for v in setting):
        return "; ".join(
            f"{r.get('filter') or '*'}: {setting_text(r.get('value'))}" for r in setting
        )
    return "[" + ", ".join(setting_text(v) for v in setting) + "]"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


METHOD = Method(
    "mergekit",
    MergekitConfig,
    preview=plan,
    card_key="mergekit",
    card=card_section,
    validate=validate,
    recipe=recipe,
    write=write,
)
