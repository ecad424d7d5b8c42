"""The Space's form and the YAML it writes: which fields each method shows, how the fields
become a config, and how a config (loaded, edited or an example) fills the fields.

Pure data and functions, free of gradio: `space/app.py` lays the fields out as widgets under
the names of `FORM_DEFAULTS` and wires their events to these functions. The YAML is hubmerge's
config (mergekit YAML for passthrough), validated by `hubmerge.config`; the form writes the
keys of `FORM_KEYS` and keeps every other key of the editor's text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from hubmerge import arch
from hubmerge.config import MergeConfig, loads_config
from hubmerge.errors import HubmergeError
from hubmerge.folder import yaml_text
from hubmerge.space.policy import read_config_text

#: The methods the form offers, as (label, merge_method).
METHODS = [
    ("Scaled passthrough", "passthrough"),
    ("Block expansion", "block_expansion"),
    ("NER", "ner"),
    ("OLM", "olm"),
    # mergekit's methods, computed by mergekit (the `mergekit` extra); others: edit the YAML.
    ("SLERP", "slerp"),
    ("TIES", "ties"),
    ("DARE TIES", "dare_ties"),
    ("Task arithmetic", "task_arithmetic"),
    ("Weighted average", "linear"),
]
#: The methods the mergekit form (a base model, models with weights, slerp's `t`) writes.
MERGEKIT_FORMS = ("slerp", "ties", "dare_ties", "task_arithmetic", "linear")
DTYPES = [("as the models", ""), *((d, d) for d in ("bfloat16", "float16", "float32"))]

#: The form's fields before a config fills them.
FORM_DEFAULTS: dict[str, Any] = {
    "method": "block_expansion",
    "slices": [["", 0, 4, ""]],
    "model": "",
    "pattern": "append",
    "count": 8,
    "zero": ", ".join(arch.RESIDUAL_OUTPUTS),
    "ner_base": "",
    "ner_models": "",
    "granularity": "layer",
    "normalize": "none",
    "embeddings": "base",
    "olm_models": "",
    "olm_base": "",
    "datasets": [["", "exact", ""]],
    "direction": "backward",
    "samples": 200,
    "mk_base": "",
    "mk_models": [["", "", ""]],
    "mk_t": "0.5",
    "dtype": "",
}
#: The config keys each method's form fields write; other keys in the editor are kept as they are.
FORM_KEYS = {
    "passthrough": {"slices"},
    "block_expansion": {"model", "append", "interleave", "zero"},
    "ner": {"base_model", "models", "granularity", "normalize", "embeddings"},
    "olm": {"models", "base_model", "dataset", "direction", "samples"},
} | dict.fromkeys(MERGEKIT_FORMS, {"base_model", "models", "parameters"})


def _seed_004() -> dict[str, Any]:
    """Seed 004's scaled passthrough: o_proj and down_proj scaled up by depth, 1.5 to 4.0."""
    ranges = [(0, 4, None)] + [(4 * i, 4 * i + 4, 1 + 0.5 * ((i + 1) // 2)) for i in range(1, 11)]
    ranges.append((44, 47, 4.0))
    slices = []
    for start, end, value in ranges:
        source: dict[str, Any] = {"model": "Sao10K/Fimbulvetr-11B-v2", "layer_range": [start, end]}
        if value is not None:
            rules = [{"filter": "o_proj", "value": value}, {"filter": "down_proj", "value": value}]
            source["parameters"] = {"scale": rules}
        slices.append({"sources": [source]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": "bfloat16"}


#: One click loads each into the editor and the form: configs shaped like the seeds'.
EXAMPLES: dict[str, dict[str, Any]] = {
    "Append 8 layers": {
        "merge_method": "block_expansion",
        "model": "openchat/openchat-3.5-0106",
        "append": 8,
        "zero": list(arch.RESIDUAL_OUTPUTS),
        "dtype": "bfloat16",
    },
    "Scaled passthrough": _seed_004(),
    "NER selection": {
        "merge_method": "ner",
        "base_model": "Qwen/Qwen2.5-7B",
        "models": ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-Coder-7B"],
        "granularity": "layer",
        "dtype": "bfloat16",
    },
    "OLM pool": {
        "merge_method": "olm",
        "base_model": "Qwen/Qwen2.5-7B",
        "models": ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-Coder-7B"],
        # Files in a Hub dataset repo: what a shared Space reads (never files on the server).
        "dataset": {
            "hf://datasets/your-org/olm-datasets/math.json": {"mode": "exact"},
            "hf://datasets/your-org/olm-datasets/chat.json": {"mode": "bigram"},
            "hf://datasets/your-org/olm-datasets/writing.json": {"mode": "quality"},
        },
        "direction": "backward",
        "samples": 200,
        "dtype": "bfloat16",
    },
    "TIES": {
        "merge_method": "ties",
        "base_model": "Qwen/Qwen2.5-7B",
        "models": [
            {"model": "Qwen/Qwen2.5-7B-Instruct", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "Qwen/Qwen2.5-Math-7B", "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "dtype": "bfloat16",
    },
}

#: The groups of fields the form shows, one at a time: each method's own, and one that every
#: method mergekit computes shares.
FORM_GROUPS = ("passthrough", "block_expansion", "ner", "olm", "mergekit")


def form_group(method: str) -> str | None:
    """The group of fields `method` shows (None: the form has none; the YAML describes it)."""
    if method in MERGEKIT_FORMS:
        return "mergekit"
    return method if method in FORM_GROUPS else None


#: What a table's cell holds, named as gradio's `Dataframe(datatype=...)` names it.
CellKind = Literal["str", "number"]


@dataclass(frozen=True)
class FormTable:
    """A table of the form: its column headers and what each column's cells hold.

    Its value is a list of rows, one cell per column; `table_rows` reads it back.
    """

    headers: tuple[str, ...]
    datatypes: tuple[CellKind, ...]


SLICE_TABLE = FormTable(
    ("model", "from layer", "to layer (exclusive)", "scale"), ("str", "number", "number", "str")
)
DATASET_TABLE = FormTable(
    (
        "dataset (hf://datasets/ORG/NAME/FILE.json, or a local file when self-hosted)",
        "mode: exact, bigram or quality",
        "samples",
    ),
    ("str", "str", "number"),
)
MERGEKIT_TABLE = FormTable(("model", "weight", "density (TIES, DARE)"), ("str", "str", "str"))
#: The layer map a validation shows (`Checked.rows`), read only.
PLAN_HEADERS = ("output layer", "source model", "source layer", "scales")
#: An empty row of the slice table, for the visitor to fill in.
_EMPTY_SLICE = ["", 0, 1, ""]


# -- cells ---------------------------------------------------------------------------------------


def scale_text(setting: Any) -> str:
    """A scale setting as the form's cell shows it: `1.5`, `[0.5, 1]`, `o_proj=1.5, 1.0`."""
    if setting is None:
        return ""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return ", ".join(
            f"{rule['filter']}={_number_text(rule['value'])}"
            if rule.get("filter")
            else _number_text(rule["value"])
            for rule in setting
        )
    return _number_text(setting)


def _number_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}"


def parse_scale(text: str) -> Any:
    """The cell back as a scale setting: a number, a gradient, or `{filter, value}` rules.

    Commas inside brackets belong to a gradient; what cannot be read stays text, so the config's
    validation names the slice.
    """
    text = str(text or "").strip()
    if not text:
        return None
    rules = []
    for item in re.split(r",(?![^\[]*\])", text):
        name, sep, value = item.rpartition("=")
        rule = {"filter": name.strip()} if sep else {}
        rules.append(rule | {"value": _number(value)})
    if len(rules) == 1 and "filter" not in rules[0]:
        return rules[0]["value"]
    return rules


def _number(text: str) -> Any:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)  # a gradient: [0.5, 1.0]
    except yaml.YAMLError:
        return text


def _int(value: Any) -> Any:
    """A table or number cell as an int; anything else as it is, for validation to report."""
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return value


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def table_rows(table: Any) -> list[list[Any]]:
    """A table's filled rows (gradio gives a list of rows, or a dict with `data`)."""
    rows = table.get("data", []) if isinstance(table, Mapping) else table or []
    return [list(row) for row in rows if row and str(row[0] or "").strip()]


# -- the form and the YAML -----------------------------------------------------------------------


def form_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys the form's fields describe, for the chosen method."""
    method = values["method"]
    data: dict[str, Any] = {"merge_method": method}
    if method == "passthrough":
        data["slices"] = []
        for model, start, end, scale in (row[:4] for row in table_rows(values["slices"])):
            source: dict[str, Any] = {
                "model": str(model).strip(),
                "layer_range": [_int(start), _int(end)],
            }
            if (setting := parse_scale(scale)) is not None:
                source["parameters"] = {"scale": setting}
            data["slices"].append({"sources": [source]})
    elif method == "block_expansion":
        data["model"] = values["model"].strip()
        data[values["pattern"]] = _int(values["count"])
        data["zero"] = [z for z in re.split(r"[\s,]+", values["zero"]) if z]
    elif method == "ner":
        data["base_model"] = values["ner_base"].strip()
        data["models"] = _lines(values["ner_models"])
        for key in ("granularity", "normalize", "embeddings"):
            data[key] = values[key]
    elif method == "olm":
        data["models"] = _lines(values["olm_models"])
        if values["olm_base"].strip():
            data["base_model"] = values["olm_base"].strip()
        data["dataset"] = {
            str(name).strip(): {"mode": str(mode or "").strip()}
            | ({"samples": _int(samples)} if str(samples or "").strip() else {})
            for name, mode, samples in (row[:3] for row in table_rows(values["datasets"]))
        }
        data["direction"] = values["direction"]
        data["samples"] = _int(values["samples"])
    elif method in MERGEKIT_FORMS:
        base = values["mk_base"].strip()
        if base and method != "linear":  # a weighted average has no base model
            data["base_model"] = base
        data["models"] = []
        for model, weight, density in (row[:3] for row in table_rows(values["mk_models"])):
            parameters = {}
            if method != "slerp" and (setting := parse_scale(weight)) is not None:
                parameters["weight"] = setting
            if method in ("ties", "dare_ties") and (setting := parse_scale(density)) is not None:
                parameters["density"] = setting
            entry: dict[str, Any] = {"model": str(model).strip()}
            data["models"].append(entry | ({"parameters": parameters} if parameters else {}))
        if method == "slerp":
            data["parameters"] = {"t": parse_scale(values["mk_t"])}
    if values["dtype"]:
        data["dtype"] = values["dtype"]
    return data


def form_yaml(values: Mapping[str, Any], current: str) -> str:
    """The editor's new text: the form's keys, and every other key of the current text kept
    (hub:, card:, base_model, ...) when it describes the same method.
    """
    data = form_config(values)
    try:
        old = yaml.safe_load(current)
    except yaml.YAMLError:
        old = None
    if isinstance(old, dict) and old.get("merge_method") == data["merge_method"]:
        owned = FORM_KEYS[data["merge_method"]] | {"merge_method", "dtype"}
        data |= {k: v for k, v in old.items() if k not in owned}
    return yaml_text(data)


def config_form(config: MergeConfig) -> dict[str, Any]:
    """The form's fields for a validated config (the method's fields, the method, the dtype)."""
    data = config.model_dump(mode="json", exclude_none=True)
    method = data["merge_method"]
    values: dict[str, Any] = {"method": method, "dtype": data.get("dtype", "")}
    if method == "passthrough":
        values["slices"] = [
            [
                s["sources"][0]["model"],
                *s["sources"][0]["layer_range"],
                scale_text(
                    s["sources"][0].get("parameters", {}).get("scale")
                    or s.get("parameters", {}).get("scale")
                ),
            ]
            for s in data["slices"]
        ]
    elif method == "block_expansion":
        pattern = "interleave" if "interleave" in data else "append"
        values |= {"model": data["model"], "pattern": pattern, "count": data[pattern]}
        values["zero"] = ", ".join(data["zero"])
    elif method == "ner":
        values |= {"ner_base": data["base_model"], "ner_models": "\n".join(data["models"])}
        values |= {k: data[k] for k in ("granularity", "normalize", "embeddings")}
    elif method == "olm":
        values |= {"olm_models": "\n".join(data["models"]), "olm_base": data.get("base_model", "")}
        values["datasets"] = [
            [name, spec["mode"], spec.get("samples", "")] for name, spec in data["dataset"].items()
        ]
        values |= {"direction": data["direction"], "samples": data["samples"]}
    elif method in MERGEKIT_FORMS and "models" in data:  # a selection `linear` has slices
        values["mk_base"] = data.get("base_model", "")
        values["mk_models"] = [
            [
                m["model"],
                scale_text(m.get("parameters", {}).get("weight")),
                scale_text(m.get("parameters", {}).get("density")),
            ]
            for m in data["models"]
            if m["model"] != data.get("base_model")
        ]
        values["mk_t"] = scale_text(data.get("parameters", {}).get("t"))
    else:
        raise HubmergeError(f"merge_method {method}: the form has no fields for it; edit the YAML")
    return values


def form_from_text(text: str) -> dict[str, Any]:
    """The form's fields for the editor's text, validated as the Space validates every config
    (`read_config_text`: on a shared Space, Hub models only).
    """
    return config_form(read_config_text(text))


def example_yaml(name: str) -> str:
    """Example `name` as the editor shows it."""
    return yaml_text(EXAMPLES[name])


def opening_form() -> tuple[str, dict[str, Any]]:
    """What the page opens on: the first example, in the editor and in the form."""
    text = example_yaml(next(iter(EXAMPLES)))
    return text, FORM_DEFAULTS | config_form(loads_config(text, "example"))


# -- the slice table's buttons ------------------------------------------------------------------


def add_slice(table: Any) -> list[list[Any]]:
    """The slice table with one more row: the last row's model, from where it stops."""
    rows = table_rows(table)
    if not rows:
        return [list(_EMPTY_SLICE)]
    model, end = rows[-1][0], _int(rows[-1][2])
    start = end if isinstance(end, int) else 0
    return [*rows, [model, start, start + 1, ""]]


def remove_slice(table: Any) -> list[list[Any]]:
    """The slice table without its last row (one empty row stays, to fill in)."""
    rows = table_rows(table)[:-1]
    return rows or [list(_EMPTY_SLICE)]
