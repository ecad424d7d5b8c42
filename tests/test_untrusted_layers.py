"""Crafted layer structures and `config.json` files: refused before planning, in one line.

A model whose layers do not add up (a layer short of a tensor its siblings have, a layer named
`00` next to `0`, tensors beyond `num_hidden_layers`) would be written short or shadowed with
exit code 0; a `config.json` that is not an object, or declares a billion layers, would crash
or eat the machine's memory. Each is refused within a second, from headers and config alone.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import write_yaml
from tests.test_bad_input import assert_refused


def crafted(models: dict[str, Path], tmp_path: Path, **renames: str | None) -> Path:
    """The tiny Llama with tensors renamed (or removed, for None)."""
    model = Path(shutil.copytree(models["llama"], tmp_path / "crafted"))
    state = load_file(model / "model.safetensors")
    for old, new in renames.items():
        value = state.pop(old.replace("__", "."))
        if new is not None:
            state[new] = value
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    return model


def set_config(model: Path, **values: Any) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | values))


def expand(tmp_path: Path, append: int = 1) -> Path:
    return write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": "crafted", "append": append},
    )


def refused_fast(tmp_path: Path, *needles: str) -> None:
    start = time.monotonic()
    assert_refused(tmp_path, expand(tmp_path), *needles)
    assert time.monotonic() - start < 10  # generous: far under a second on a quiet machine


def test_a_layer_short_of_a_tensor_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    crafted(models, tmp_path, model__layers__2__mlp__up_proj__weight=None)
    refused_fast(tmp_path, "crafted: layer 2: tensor mlp.up_proj.weight is missing")


def test_a_layer_with_an_extra_tensor_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """The other layers lack it: which layer is damaged cannot be told, the model is refused."""
    crafted(models, tmp_path, model__norm__weight="model.layers.1.extra.weight")
    refused_fast(tmp_path, "crafted: layer 0: tensor extra.weight is missing")


@pytest.mark.parametrize("name", ["model.layers.00.mlp.up_proj.weight", "model.layers.+1.x"])
def test_non_canonical_layer_numbers_are_refused(
    models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    crafted(models, tmp_path, model__norm__weight=name)
    refused_fast(tmp_path, f"crafted: tensor '{name}' is not named model.layers.N.NAME")


def test_tensors_beyond_the_declared_layers_are_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    model = crafted(models, tmp_path)
    set_config(model, num_hidden_layers=3)
    refused_fast(tmp_path, "tensor model.layers.3.", "is beyond num_hidden_layers")


@pytest.mark.parametrize(
    "value", [10**9, 1_000_000, 10_001, 0, -4, True, 4.0, "4", None, [4]], ids=repr
)
def test_num_hidden_layers_must_be_a_sane_integer(
    models: dict[str, Path], tmp_path: Path, value: Any
) -> None:
    model = crafted(models, tmp_path)
    set_config(model, num_hidden_layers=value)
    refused_fast(tmp_path, "crafted: config.json: num_hidden_layers must be an integer from 1")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[1, 2]", "config.json is not a JSON object"),
        ("null", "config.json is not a JSON object"),
        ("{", "config.json is not valid JSON"),
        ('{"architectures": {"LlamaForCausalLM": 1}}', "unsupported architecture"),
        ('{"architectures": "LlamaForCausalLM"}', "unsupported architecture"),
        ('{"architectures": [["LlamaForCausalLM"]]}', "unsupported architecture"),
    ],
)
def test_config_json_must_be_an_object_of_sane_values(
    models: dict[str, Path], tmp_path: Path, text: str, needle: str
) -> None:
    model = crafted(models, tmp_path)
    (model / "config.json").write_text(text)
    refused_fast(tmp_path, "crafted: ", needle)


@pytest.mark.parametrize(("key", "value"), [("hidden_size", "32"), ("vocab_size", -1)])
def test_shape_fields_must_be_positive_integers(
    models: dict[str, Path], tmp_path: Path, key: str, value: Any
) -> None:
    model = crafted(models, tmp_path)
    set_config(model, **{key: value})
    refused_fast(tmp_path, f"crafted: config.json: {key} must be a positive integer")


def test_an_oversized_config_json_is_not_read(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hubmerge.sources.MAX_CONFIG_JSON_BYTES", 10_000)
    model = crafted(models, tmp_path)
    set_config(model, padding="x" * 20_000)
    refused_fast(tmp_path, "crafted: config.json is over 10,000 bytes")
