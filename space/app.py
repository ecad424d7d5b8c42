"""hubmerge's Hugging Face Space: describe a merge, check its plan, merge it and publish it.

A thin page over hubmerge's Python API: the config is hubmerge's (mergekit YAML for
passthrough), validated by `hubmerge.config`, previewed and merged by `hubmerge.space`, and
published by `hubmerge.hub`. What this file adds is the form, which writes that YAML, and the
wiring. Run it with `python space/app.py`; as a Space (`SYSTEM=spaces`) or with
`HUBMERGE_SPACE=1` it serves strangers: Hub models only, one merge at a time, a bounded queue.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import gradio as gr
import yaml
from gradio.utils import get_space

from hubmerge import space
from hubmerge.config import MergeConfig, loads_config
from hubmerge.errors import HubmergeError, TokenError
from hubmerge.hub import publish, scrub
from hubmerge.plan import recipe_yaml

#: Waiting merges beyond this are turned away: each holds a visitor's page open for minutes.
QUEUE_SIZE = 16
#: A finished model waits this long for its publish, then its folder is removed.
KEEP_SECONDS = 3600
#: How often the page's log and progress bar follow a running merge.
POLL_SECONDS = 0.25

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
MERGEKIT_HEADERS = ["model", "weight", "density (TIES, DARE)"]
DTYPES = [("as the models", ""), *((d, d) for d in ("bfloat16", "float16", "float32"))]
SLICE_HEADERS = ["model", "from layer", "to layer (exclusive)", "scale"]
DATASET_HEADERS = [
    "dataset (hf://datasets/ORG/NAME/FILE.json, or a local file when self-hosted)",
    "mode: exact, bigram or quality",
    "samples",
]
PLAN_HEADERS = ["output layer", "source model", "source layer", "scales"]

#: The form's fields before a config fills them.
FORM_DEFAULTS: dict[str, Any] = {
    "method": "block_expansion",
    "slices": [["", 0, 4, ""]],
    "model": "",
    "pattern": "append",
    "count": 8,
    "zero": "o_proj, down_proj",
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
        "zero": ["o_proj", "down_proj"],
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

CSS = """
.gradio-container { max-width: 1280px !important; margin: auto; }
.status-error { border-left: 4px solid #dc2626; padding: 4px 12px; background: #fef2f2; }
.status-ok { border-left: 4px solid #16a34a; padding: 4px 12px; background: #f0fdf4; }
.card-preview { border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px 16px; }
"""
THEME = gr.themes.Soft(
    primary_hue="indigo",
    # System fonts: the default theme's web fonts would make every page load reach out.
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)


# -- the form and the YAML ------------------------------------------------------------------


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


def _rows(table: Any) -> list[list[Any]]:
    """A table's filled rows (gradio gives a list of rows, or a dict with `data`)."""
    rows = table.get("data", []) if isinstance(table, Mapping) else table or []
    return [list(row) for row in rows if row and str(row[0] or "").strip()]


def _editable_table(
    value: Any, headers: list[str], datatype: list[str], label: str
) -> gr.Dataframe:
    """A form table the visitor edits, whose value `_rows` reads back: a list of rows."""
    return gr.Dataframe(
        value,
        headers=headers,
        datatype=datatype,
        type="array",
        column_count=len(headers),
        interactive=True,
        label=label,
    )


def form_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys the form's fields describe, for the chosen method."""
    method = values["method"]
    data: dict[str, Any] = {"merge_method": method}
    if method == "passthrough":
        data["slices"] = []
        for model, start, end, scale in (row[:4] for row in _rows(values["slices"])):
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
            for name, mode, samples in (row[:3] for row in _rows(values["datasets"]))
        }
        data["direction"] = values["direction"]
        data["samples"] = _int(values["samples"])
    elif method in MERGEKIT_FORMS:
        base = values["mk_base"].strip()
        if base and method != "linear":  # a weighted average has no base model
            data["base_model"] = base
        data["models"] = []
        for model, weight, density in (row[:3] for row in _rows(values["mk_models"])):
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
    return recipe_yaml(data)


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


# -- messages ---------------------------------------------------------------------------------


def add_slice(table: Any) -> list[list[Any]]:
    """The slice table with one more row: the last row's model, from where it stops."""
    rows = _rows(table)
    if not rows:
        return [["", 0, 1, ""]]
    model, end = rows[-1][0], _int(rows[-1][2])
    start = end if isinstance(end, int) else 0
    return [*rows, [model, start, start + 1, ""]]


def remove_slice(table: Any) -> list[list[Any]]:
    """The slice table without its last row (one empty row stays, to fill in)."""
    rows = _rows(table)[:-1]
    return rows or [["", 0, 1, ""]]


def _escape(text: str) -> str:
    """Plain text for a Markdown view: hubmerge's messages quote names like `down_proj`."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def error_status(error: BaseException, secret: str = "") -> str:
    """One line for the page: hubmerge's own message, or the kind of an unexpected failure."""
    if isinstance(error, HubmergeError):
        message = str(error)
    else:  # a bug: the details go to the server's log, the page gets the gist
        traceback.print_exception(error)
        message = f"unexpected {type(error).__name__}: {error}"
    message = scrub(message, secret)
    return f"<div class='status-error'>\n\n**Error:** {_escape(message)}\n\n</div>"


def ok_status(message: str) -> str:
    return f"<div class='status-ok'>\n\n{message}\n\n</div>"


# -- handlers ---------------------------------------------------------------------------------


def validate(text: str) -> tuple[str, list[list[str]]]:
    """Check the config and the models' configs; the layer map where it is known already."""
    try:
        result = space.check(text)  # in a subprocess with its own time and memory budget
    except Exception as e:
        return error_status(e), []
    models = ", ".join(f"`{ref}` ({n} layers)" for ref, n in result.layers.items())
    if result.parameters is not None:
        tables = "\n\n".join(_markdown_table(table) for table in result.parameters)
        return ok_status(
            f"Valid {result.method} config: {result.depth} layers from {models}, computed by "
            "mergekit: each tensor blends the models' tensors, with these parameters.\n\n" + tables
        ), []
    if result.rows is None:
        return ok_status(
            f"Valid {result.method} config: {models}. This method chooses each layer while "
            "merging, so its layer map comes with the model card."
        ), []
    return ok_status(
        f"Valid: {result.depth} layers from {models}. Planned from the models' "
        "`config.json` files alone; scales are resolved per tensor when merging."
    ), [list(row) for row in result.rows]


def _markdown_table(table: Mapping[str, Any]) -> str:
    """A parameter table (`mergekit_run.parameter_tables`) as Markdown, every cell escaped."""
    lines = [
        f"**{_escape(table['title'])}**",
        "",
        "| " + " | ".join(_escape(c) for c in table["columns"]) + " |",
        "|" + "---|" * len(table["columns"]),
    ]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def merge_model(
    text: str,
    name: str,
    previous: str | None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - how gradio hands a handler its bar
) -> Iterator[tuple[Any, ...]]:
    """Merge in a subprocess, streaming its log; then the card, the files and the model.

    Yields (status, log, card, files, model folder). A visitor keeps one model: the previous
    one's folder is removed when the next merge starts. The config is checked first, without
    waiting for the merges before it (they take turns: `space.JOB_SLOTS`).
    """
    space.discard(previous)
    try:
        space.check(text)
        job = space.MergeJob(space.read_config_text(text), name)
    except Exception as e:
        yield error_status(e), "", "", None, None
        return
    try:
        yield ok_status("Merging…"), "", "", None, None
        shown = 0
        while not job.wait(POLL_SECONDS):
            if job.reporter.bar:
                description, done, total = job.reporter.bar
                progress(int(done) / max(int(total), 1), desc=str(description))
            if len(job.reporter.lines) != shown:
                shown = len(job.reporter.lines)
                yield ok_status("Merging…"), job.reporter.text, "", None, None
    except GeneratorExit:  # the visitor left: the folder goes once the merge stops
        job.abandon()
        raise
    if job.error is not None:
        job.close()
        yield error_status(job.error), job.reporter.text, "", None, None
        return
    yield (
        ok_status(f"Merged **{_escape(job.out_dir.name)}**: its card is below; publish it next."),
        job.reporter.text,
        space.card_markdown(job.out_dir),
        [str(path) for path in space.download_files(job.out_dir)],
        str(job.out_dir),
    )


def publish_model(
    model_dir: str | None,
    repo_id: str,
    private: bool,
    pasted_token: str,
    oauth_token: gr.OAuthToken | None,
    profile: gr.OAuthProfile | None,
) -> str:
    """Upload the merged model with the visitor's token (signed in, or pasted; never echoed).

    The Space's own token is never used: without one of the visitor's, nothing is published.
    """
    token = (pasted_token or "").strip() or (oauth_token.token if oauth_token else "")
    if not model_dir:
        return error_status(HubmergeError("nothing to publish yet: merge a model first"))
    if not token:
        return error_status(
            HubmergeError("sign in with Hugging Face, or paste a token with write access")
        )
    repo_id = repo_id.strip()
    if "/" not in repo_id and profile is not None:
        repo_id = f"{profile.username}/{repo_id}"
    try:
        result = publish(model_dir, repo_id, private=private, token=token)
    except TokenError:  # the CLI's advice (`hf auth login`, --token) means nothing on a page
        return error_status(
            HubmergeError(
                f"{repo_id}: the Hub refused the token (401: invalid or expired): sign in with "
                "Hugging Face again, or paste a token with write access"
            )
        )
    except Exception as e:
        return error_status(e, secret=token)
    visibility = "private" if private else "public"
    return ok_status(f"Published ({visibility}): [{result.url}]({result.url})")


# -- the page ---------------------------------------------------------------------------------


def build_demo() -> gr.Blocks:
    """The page and its events (`launch` adds the queue, theme and CSS)."""
    shared = space.shared_space()
    # The page opens on the first example, in the editor and in the form.
    first = recipe_yaml(next(iter(EXAMPLES.values())))
    start = FORM_DEFAULTS | config_form(loads_config(first, "example"))
    with gr.Blocks(title="hubmerge", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# hubmerge\nCompose a model from other models' layers: scaled passthrough "
            "(mergekit YAML as is), block expansion (LLaMA Pro), NER or OLM layer selection; "
            "or blend them with mergekit's methods (SLERP, TIES, DARE, task arithmetic, any "
            "mergekit YAML). Check the plan, merge, read the model card, publish to the Hub."
            + (
                "\n\nThis shared Space merges public Hub models (`ORG/NAME`), one merge at a time."
                if shared
                else ""
            )
        )
        fields: dict[str, Any] = {}
        groups: dict[str, gr.Column] = {}
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                gr.Markdown("### 1. Describe the merge")
                fields["method"] = gr.Radio(METHODS, value=start["method"], label="Method")
                with gr.Column(visible=start["method"] == "passthrough") as groups["passthrough"]:
                    fields["slices"] = _editable_table(
                        start["slices"],
                        SLICE_HEADERS,
                        ["str", "number", "number", "str"],
                        "Slices, stacked in order",
                    )
                    with gr.Row():
                        add_row = gr.Button("Add slice", size="sm", variant="secondary")
                        remove_row = gr.Button("Remove last slice", size="sm", variant="secondary")
                    gr.Markdown(
                        "Scale: a number, a gradient `[0.5, 1]`, or rules "
                        "`o_proj=1.5, down_proj=1.5, 1.0` (the first matching name wins)."
                    )
                with gr.Column(visible=start["method"] == "block_expansion") as groups[
                    "block_expansion"
                ]:
                    fields["model"] = gr.Textbox(
                        start["model"], label="Model", placeholder="ORG/NAME"
                    )
                    with gr.Row():
                        fields["pattern"] = gr.Radio(
                            [
                                ("append copies of the last layer", "append"),
                                ("a copy after every N layers", "interleave"),
                            ],
                            value=start["pattern"],
                            label="Expansion",
                        )
                        fields["count"] = gr.Number(
                            start["count"], precision=0, minimum=1, label="K or N"
                        )
                    fields["zero"] = gr.Textbox(
                        start["zero"], label="Zeroed in each copy (identity blocks)"
                    )
                with gr.Column(visible=start["method"] == "ner") as groups["ner"]:
                    fields["ner_base"] = gr.Textbox(
                        start["ner_base"], label="Base model", placeholder="ORG/NAME"
                    )
                    fields["ner_models"] = gr.Textbox(
                        start["ner_models"], lines=3, label="Candidate models, one per line"
                    )
                    with gr.Row():
                        for key, choices, label in (
                            ("granularity", ["layer", "module"], "Choose per"),
                            ("normalize", ["none", "minmax"], "Normalize"),
                            ("embeddings", ["base", "ner"], "Embeddings"),
                        ):
                            fields[key] = gr.Radio(choices, value=start[key], label=label)
                with gr.Column(visible=start["method"] == "olm") as groups["olm"]:
                    fields["olm_models"] = gr.Textbox(
                        start["olm_models"], lines=3, label="Pool models, one per line"
                    )
                    fields["olm_base"] = gr.Textbox(
                        start["olm_base"], label="Base model (optional)"
                    )
                    fields["datasets"] = _editable_table(
                        start["datasets"],
                        DATASET_HEADERS,
                        ["str", "str", "number"],
                        "Evaluation datasets",
                    )
                    with gr.Row():
                        fields["direction"] = gr.Radio(
                            ["backward", "forward"], value=start["direction"], label="Direction"
                        )
                        fields["samples"] = gr.Number(
                            start["samples"], precision=0, minimum=1, label="Samples"
                        )
                mergekit_form = start["method"] in MERGEKIT_FORMS
                with gr.Column(visible=mergekit_form) as groups["mergekit"]:
                    fields["mk_base"] = gr.Textbox(
                        start["mk_base"],
                        label="Base model (not for a weighted average)",
                        placeholder="ORG/NAME",
                    )
                    fields["mk_models"] = _editable_table(
                        start["mk_models"],
                        MERGEKIT_HEADERS,
                        ["str", "str", "str"],
                        "Models merged with the base",
                    )
                    fields["mk_t"] = gr.Textbox(
                        start["mk_t"],
                        label="SLERP t: 0 is the base, 1 the other model",
                    )
                    gr.Markdown(
                        "Computed by mergekit. A value is a number, a gradient over the layers "
                        "`[0, 0.5, 1]`, or rules `self_attn=[0, 1], mlp=[1, 0], 0.5`. Other "
                        "mergekit methods (della, model_stock, breadcrumbs, ...): edit the YAML."
                    )
                fields["dtype"] = gr.Dropdown(DTYPES, value=start["dtype"], label="Output dtype")
            with gr.Column(scale=4):
                gr.Markdown("### Config (YAML)")
                editor = gr.Code(
                    first, language="yaml", lines=18, max_lines=30, label="hubmerge / mergekit YAML"
                )
                load = gr.Button("Load YAML into form", size="sm")
                gr.Markdown("Examples:")
                with gr.Row():
                    example_buttons = {
                        name: gr.Button(name, size="sm", variant="secondary") for name in EXAMPLES
                    }

        gr.Markdown("### 2. Check the plan")
        validate_button = gr.Button("Validate", variant="secondary")
        status = gr.Markdown()
        plan = gr.Dataframe(headers=PLAN_HEADERS, interactive=False, label="Layer map", wrap=True)

        gr.Markdown("### 3. Merge")
        with gr.Row(equal_height=True):
            name = gr.Textbox("my-merge", label="Model name", scale=3)
            merge_button = gr.Button("Merge", variant="primary", scale=1)
        merge_status = gr.Markdown()
        with gr.Row(equal_height=False):
            log = gr.Textbox(
                label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False, scale=2
            )
            files = gr.File(
                file_count="multiple", label="Files", interactive=False, scale=1, height=300
            )
        card = gr.Markdown(elem_classes="card-preview", elem_id="card")
        model_dir = gr.State(None, time_to_live=KEEP_SECONDS, delete_callback=space.discard)

        gr.Markdown("### 4. Publish")
        with gr.Row(equal_height=True):
            if get_space():  # Hugging Face sign-in exists on Spaces only (OAuth needs the Hub)
                gr.LoginButton(scale=1)
            token = gr.Textbox(
                type="password",
                label="Hub token with write access (or sign in on the Space)",
                placeholder="hf_…",
                scale=2,
            )
            repo = gr.Textbox(
                label="Repository", placeholder="ORG/NAME (or NAME when signed in)", scale=2
            )
        with gr.Row(equal_height=True):
            private = gr.Checkbox(label="Private repository", scale=1)
            publish_button = gr.Button("Publish", variant="primary", scale=3)
        published = gr.Markdown()

        # Wiring. The form writes the YAML on every input from the visitor (not on updates it
        # gets from "Load YAML into form", which would rewrite what was just loaded).
        names, components = list(fields), list(fields.values())

        def to_yaml(*args: Any) -> str:
            return form_yaml(dict(zip(names, args[:-1], strict=True)), args[-1])

        def to_form(text: str) -> dict[Any, Any]:
            try:
                values = config_form(space.read_config_text(text))
            except Exception as e:
                return {status: error_status(e)}
            return {fields[k]: v for k, v in values.items()} | {status: ""}

        for component in components:
            component.input(
                to_yaml, [*components, editor], editor, queue=False, api_visibility="private"
            )
        fields["method"].change(
            lambda m: [
                gr.update(visible=m == k or (k == "mergekit" and m in MERGEKIT_FORMS))
                for k in groups
            ],
            fields["method"],
            list(groups.values()),
            queue=False,
            api_visibility="private",
        )
        for button, edit in ((add_row, add_slice), (remove_row, remove_slice)):
            button.click(
                edit, fields["slices"], fields["slices"], queue=False, api_visibility="private"
            ).then(to_yaml, [*components, editor], editor, queue=False, api_visibility="private")
        load.click(to_form, editor, [*components, status], api_name="load_yaml")
        for example, button in example_buttons.items():
            text = recipe_yaml(EXAMPLES[example])
            button.click(
                lambda t=text: t, None, editor, queue=False, api_visibility="private"
            ).then(to_form, editor, [*components, status], api_visibility="private")
        validate_button.click(
            validate, editor, [status, plan], api_name="validate", concurrency_limit=4
        )
        merge_button.click(
            merge_model,
            [editor, name, model_dir],
            [merge_status, log, card, files, model_dir],
            api_name="merge",
            # Every waiting visitor's config is checked at once; the merges themselves take
            # turns inside (`space.JOB_SLOTS`), each with its own time and memory budget.
            concurrency_limit=QUEUE_SIZE,
            # The bar goes where the files will be, so the log stays readable while it streams.
            show_progress_on=files,
        )
        publish_button.click(
            publish_model, [model_dir, repo, private, token], published, api_name="publish"
        )
    return demo


def launch(**kwargs: Any) -> gr.Blocks:
    """Build the page, queue it (one merge at a time) and serve it; `kwargs` go to `launch`."""
    if space.shared_space():
        space.refuse_implicit_token()
    demo = build_demo()
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    demo.launch(theme=THEME, css=CSS, **kwargs)
    return demo


if __name__ == "__main__":
    launch()
