"""The Space's form and handlers without a page: which fields each method shows, form <-> YAML,
the slice table's buttons, and what publishing answers before it reaches the Hub.

Nothing here needs gradio or a browser: `hubmerge.space` is free of gradio, and `space/app.py`
only lays its functions out as widgets (tests/test_space.py drives the page itself).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hubmerge.config import MergekitConfig, PassthroughConfig, loads_config
from hubmerge.errors import ConfigError, HubmergeError
from hubmerge.space import SPACE_ENV, form, handlers


@pytest.fixture(autouse=True)
def _self_hosted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPACE_ENV, raising=False)
    monkeypatch.delenv("SYSTEM", raising=False)


def test_importing_the_space_package_imports_no_gradio() -> None:
    # A fresh interpreter: this one may hold gradio already, from the page's tests.
    code = (
        "import sys, hubmerge.space, hubmerge.space.form, hubmerge.space.handlers; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))"
    )
    root = Path(__file__).resolve().parents[1]  # `-c` imports from its working folder first
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_form_and_yaml_say_the_same() -> None:
    for data in form.EXAMPLES.values():
        config = loads_config(yaml.safe_dump(data), "example")
        again = form.form_config(form.FORM_DEFAULTS | form.config_form(config))
        assert loads_config(yaml.safe_dump(again), "form") == config

    assert form.parse_scale("o_proj=1.5, down_proj=[1, 2], 1") == [
        {"filter": "o_proj", "value": 1.5},
        {"filter": "down_proj", "value": [1, 2]},
        {"value": 1.0},
    ]
    assert form.scale_text(form.parse_scale("[0.5, 1]")) == "[0.5, 1]"
    # The form rewrites its own keys and keeps the rest of the editor's text.
    expansion = "merge_method: block_expansion\nmodel: org/a\nappend: 1\n"
    values = form.config_form(loads_config(expansion, "c")) | {"count": 3}
    text = form.form_yaml(values, expansion + "hub: {repo_id: me/x}\n")
    assert yaml.safe_load(text) == {
        "merge_method": "block_expansion",
        "model": "org/a",
        "append": 3,
        "zero": ["o_proj", "down_proj"],
        "hub": {"repo_id": "me/x"},
    }
    # Another method's keys are not kept: they would make the config invalid.
    ner = form.FORM_DEFAULTS | {"method": "ner", "ner_base": "org/b", "ner_models": "org/c\n"}
    assert "hub" not in yaml.safe_load(form.form_yaml(ner, text))


def test_each_method_of_the_form_shows_its_own_fields() -> None:
    methods = [value for _, value in form.METHODS]
    assert {form.form_group(m) for m in methods} == set(form.FORM_GROUPS)
    assert set(methods) == set(form.FORM_KEYS)
    assert [m for m in methods if form.form_group(m) == "mergekit"] == list(form.MERGEKIT_FORMS)
    assert form.form_group("passthrough") == "passthrough"
    assert form.form_group("della") is None  # mergekit computes it; the YAML describes it
    della = loads_config("merge_method: della\nbase_model: org/a\nmodels: [{model: org/b}]\n", "c")
    assert isinstance(della, MergekitConfig)
    with pytest.raises(HubmergeError, match="della: the form has no fields for it; edit the YAML"):
        form.config_form(della)
    # Each table's columns are the cells its rows hold.
    for name, table in (("slices", form.SLICE_TABLE), ("datasets", form.DATASET_TABLE)):
        assert len(table.headers) == len(table.datatypes) == len(form.FORM_DEFAULTS[name][0])
    assert len(form.MERGEKIT_TABLE.headers) == len(form.FORM_DEFAULTS["mk_models"][0])


def test_a_loaded_config_fills_the_form(monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
        merge_method: passthrough
        slices:
          - sources: [{model: org/a, layer_range: [0, 4]}]
          - sources:
              - model: org/a
                layer_range: [2, 6]
                parameters: {scale: [{filter: o_proj, value: 1.5}, {value: 1.0}]}
        dtype: bfloat16
    """
    values = form.form_from_text(text)
    assert values["method"] == "passthrough" and values["dtype"] == "bfloat16"
    assert values["slices"] == [["org/a", 0, 4, ""], ["org/a", 2, 6, "o_proj=1.5, 1"]]
    assert form.form_group(values["method"]) == "passthrough"
    # Filled from the form again, the config is the one loaded.
    written = loads_config(form.form_yaml(form.FORM_DEFAULTS | values, ""), "form")
    assert isinstance(written, PassthroughConfig)
    assert written == loads_config(text, "config")
    # Loading validates as the Space does: a shared Space refuses a folder on the server.
    monkeypatch.setenv(SPACE_ENV, "1")
    with pytest.raises(ConfigError, match="not a Hub id"):
        form.form_from_text(text.replace("org/a", "/srv/models/a"))


def test_the_page_opens_on_the_first_example() -> None:
    text, values = form.opening_form()
    first = next(iter(form.EXAMPLES.values()))
    assert yaml.safe_load(text) == first
    assert set(values) == set(form.FORM_DEFAULTS)
    assert form.form_config(values) == first


def test_the_slice_table_grows_and_shrinks_by_one_row() -> None:
    rows = [["org/a", 0, 4, ""]]
    grown = form.add_slice(rows)
    assert grown == [["org/a", 0, 4, ""], ["org/a", 4, 5, ""]]
    assert form.add_slice({"data": grown})[-1] == ["org/a", 5, 6, ""]  # gradio's dict form too
    assert form.add_slice(None) == [["", 0, 1, ""]]
    assert form.remove_slice(grown) == rows
    assert form.remove_slice(rows) == [["", 0, 1, ""]]  # one row stays, to fill in
    yaml_text = form.form_yaml(form.FORM_DEFAULTS | {"method": "passthrough", "slices": grown}, "")
    assert [s["sources"][0]["layer_range"] for s in yaml.safe_load(yaml_text)["slices"]] == [
        [0, 4],
        [4, 5],
    ]
    # Rows without a model are ones the visitor has not filled in: they write nothing.
    assert form.table_rows([["", 1, 2, ""], [None, 1, 2, ""], ["org/b", 0, 1, ""]]) == [
        ["org/b", 0, 1, ""]
    ]


def test_publishing_needs_a_model_and_the_visitors_token(tmp_path: Path) -> None:
    nothing = handlers.publish_model(None, "me/x", False, "hf_token", "me")
    assert "nothing to publish yet: merge a model first" in nothing
    no_token = handlers.publish_model(str(tmp_path), "me/x", False, "", "me")
    assert "sign in with Hugging Face, or paste a token" in no_token
    # A pasted token never reaches the page, even where an error quotes it.
    secret = "hf_secret_value"
    shown = handlers.error_status(HubmergeError(f"refused {secret}"), secret=secret)
    assert secret not in shown and "\\*\\*\\*" in shown
    assert handlers.escape("down_proj [x]") == "down\\_proj \\[x\\]"
