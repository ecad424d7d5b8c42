"""hubmerge's Hugging Face Space: describe a merge, check its plan, merge it and publish it.

A thin page over hubmerge's Python API: the config is hubmerge's (mergekit YAML for
passthrough), validated by `hubmerge.config`, previewed and merged by `hubmerge.space`, and
published by `hubmerge.hub`. This file lays out the widgets and wires their events; what the
form writes and reads (`hubmerge.space.form`) and what each button does
(`hubmerge.space.handlers`) live in `hubmerge.space`, free of gradio. Run it with
`python space/app.py`; as a Space (`SYSTEM=spaces`) or with `HUBMERGE_SPACE=1` it serves
strangers: Hub models only, one merge at a time, a bounded queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr
from gradio.utils import get_space

from hubmerge import space
from hubmerge.space import handlers
from hubmerge.space.form import (
    DATASET_TABLE,
    DTYPES,
    EXAMPLES,
    MERGEKIT_TABLE,
    METHODS,
    PLAN_HEADERS,
    SLICE_TABLE,
    FormTable,
    add_slice,
    example_yaml,
    form_from_text,
    form_group,
    form_yaml,
    opening_form,
    remove_slice,
)

#: Waiting merges beyond this are turned away: each holds a visitor's page open for minutes.
QUEUE_SIZE = 16
#: A finished model waits this long for its publish, then its folder is removed.
KEEP_SECONDS = 3600

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


# -- widgets and handlers with gradio's types ------------------------------------------------


def _editable_table(value: Any, table: FormTable, label: str) -> gr.Dataframe:
    """A form table the visitor edits, whose value `form.table_rows` reads back: a list of rows."""
    return gr.Dataframe(
        value,
        headers=list(table.headers),
        datatype=list(table.datatypes),
        type="array",
        column_count=len(table.headers),
        interactive=True,
        label=label,
    )


def merge_model(
    text: str,
    name: str,
    previous: str | None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - how gradio hands a handler its bar
) -> Iterator[tuple[Any, ...]]:
    """Merge in a subprocess, streaming its log (`handlers.merge_stream`) and moving the bar."""
    yield from handlers.merge_stream(text, name, previous, progress)


def publish_model(
    model_dir: str | None,
    repo_id: str,
    private: bool,
    pasted_token: str,
    oauth_token: gr.OAuthToken | None,
    profile: gr.OAuthProfile | None,
) -> str:
    """Publish with the visitor's token: pasted, or else the one of their sign-in."""
    token = (pasted_token or "").strip() or (oauth_token.token if oauth_token else "")
    username = profile.username if profile is not None else None
    return handlers.publish_model(model_dir, repo_id, private, token, username)


# -- the page ---------------------------------------------------------------------------------


def build_demo() -> gr.Blocks:
    """The page and its events (`launch` adds the queue, theme and CSS)."""
    shared = space.shared_space()
    first, start = opening_form()  # the first example, in the editor and in the form
    shown = form_group(start["method"])
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
        #: The groups of fields, one shown at a time (`form_group`).
        groups: dict[str, gr.Column] = {}
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                gr.Markdown("### 1. Describe the merge")
                fields["method"] = gr.Radio(METHODS, value=start["method"], label="Method")
                with gr.Column(visible=shown == "passthrough") as groups["passthrough"]:
                    fields["slices"] = _editable_table(
                        start["slices"], SLICE_TABLE, "Slices, stacked in order"
                    )
                    with gr.Row():
                        add_row = gr.Button("Add slice", size="sm", variant="secondary")
                        remove_row = gr.Button("Remove last slice", size="sm", variant="secondary")
                    gr.Markdown(
                        "Scale: a number, a gradient `[0.5, 1]`, or rules "
                        "`o_proj=1.5, down_proj=1.5, 1.0` (the first matching name wins)."
                    )
                with gr.Column(visible=shown == "block_expansion") as groups["block_expansion"]:
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
                with gr.Column(visible=shown == "ner") as groups["ner"]:
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
                with gr.Column(visible=shown == "olm") as groups["olm"]:
                    fields["olm_models"] = gr.Textbox(
                        start["olm_models"], lines=3, label="Pool models, one per line"
                    )
                    fields["olm_base"] = gr.Textbox(
                        start["olm_base"], label="Base model (optional)"
                    )
                    fields["datasets"] = _editable_table(
                        start["datasets"], DATASET_TABLE, "Evaluation datasets"
                    )
                    with gr.Row():
                        fields["direction"] = gr.Radio(
                            ["backward", "forward"], value=start["direction"], label="Direction"
                        )
                        fields["samples"] = gr.Number(
                            start["samples"], precision=0, minimum=1, label="Samples"
                        )
                with gr.Column(visible=shown == "mergekit") as groups["mergekit"]:
                    fields["mk_base"] = gr.Textbox(
                        start["mk_base"],
                        label="Base model (not for a weighted average)",
                        placeholder="ORG/NAME",
                    )
                    fields["mk_models"] = _editable_table(
                        start["mk_models"], MERGEKIT_TABLE, "Models merged with the base"
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
        plan = gr.Dataframe(
            headers=list(PLAN_HEADERS), interactive=False, label="Layer map", wrap=True
        )

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
                values = form_from_text(text)
            except Exception as e:
                return {status: handlers.error_status(e)}
            return {fields[k]: v for k, v in values.items()} | {status: ""}

        for component in components:
            component.input(
                to_yaml, [*components, editor], editor, queue=False, api_visibility="private"
            )
        fields["method"].change(
            lambda m: [gr.update(visible=form_group(m) == k) for k in groups],
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
            text = example_yaml(example)
            button.click(
                lambda t=text: t, None, editor, queue=False, api_visibility="private"
            ).then(to_form, editor, [*components, status], api_visibility="private")
        validate_button.click(
            handlers.validate, editor, [status, plan], api_name="validate", concurrency_limit=4
        )
        merge_button.click(
            merge_model,
            [editor, name, model_dir],
            [merge_status, log, card, files, model_dir],
            api_name="merge",
            # Every waiting visitor's config is checked at once; the merges themselves take
            # turns inside (`space.policy.JOB_SLOTS`), each with its own time and memory budget.
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
