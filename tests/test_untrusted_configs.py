"""Crafted merge configs and options: one line naming the key, exit code 2, nothing written.

Values that would silently do harm (a NaN scale fills the model with NaN, `layer_range:
[false, true]` reads as [0, 1], `zero: ['']` zeroes every tensor, `model: ''` is the current
folder), costs without bound (`append: 100000000`), and inputs that used to end in a
traceback (non-UTF-8 bytes, deep nesting, an unusable device, an OUT_DIR under a file) are each
refused before any model is opened, or at least before anything is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hubmerge.config import loads_config
from hubmerge.errors import ConfigError
from tests.helpers import run_cli, write_yaml
from tests.test_bad_input import assert_refused


def passthrough(source: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    source = {"model": "m", "layer_range": [0, 2]} | (source or {})
    return {"merge_method": "passthrough", "slices": [{"sources": [source]}]} | top


def refused(tmp_path: Path, config: dict[str, Any] | str | bytes, *needles: str) -> None:
    path = tmp_path / "c.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    elif isinstance(config, str):
        path.write_text(config)
    else:
        write_yaml(path, config)
    start = time.monotonic()
    assert_refused(tmp_path, path, *needles)
    assert time.monotonic() - start < 10  # generous: well under a second on a quiet machine


@pytest.mark.parametrize(
    ("scale", "needle"),
    [
        (float("nan"), "finite number"),
        (float("inf"), "finite number"),
        (-float("inf"), "finite number"),
        (1e39, "less than or equal to"),
        (True, "valid number"),
        ("2", "valid number"),
    ],
    ids=repr,
)
def test_scales_must_be_finite_numbers(tmp_path: Path, scale: Any, needle: str) -> None:
    config = passthrough({"parameters": {"scale": scale}})
    refused(tmp_path, config, "slices[0].sources[0].parameters.scale", needle)


def test_an_overflowing_literal_is_refused(tmp_path: Path) -> None:
    text = "merge_method: passthrough\nslices:\n  - sources:\n      - model: m\n"
    text += "        layer_range: [0, 2]\n        parameters: {scale: 1.0e+400}\n"
    refused(tmp_path, text, "parameters.scale", "finite number")


@pytest.mark.parametrize("key", ["scale", "weight"], ids=["a scale rule", "a gradient"])
def test_rules_and_gradients_are_checked_too(tmp_path: Path, key: str) -> None:
    if key == "scale":
        config = passthrough(parameters={"scale": [{"filter": "o_proj", "value": float("nan")}]})
        refused(tmp_path, config, "parameters.scale", "finite number")
    else:
        config = passthrough({"parameters": {"scale": [1.0, float("inf")]}})
        refused(tmp_path, config, "parameters.scale[1]", "finite number")


@pytest.mark.parametrize(
    "layer_range", [[False, True], [0.0, 2], ["0", "2"], [0, 100_000_000]], ids=repr
)
def test_layer_range_takes_integers_only(tmp_path: Path, layer_range: list[Any]) -> None:
    refused(tmp_path, passthrough({"layer_range": layer_range}), "slices[0].sources[0].layer_range")


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (passthrough({"model": ""}), "slices[0].sources[0].model: Value error, must not be empty"),
        (passthrough({"model": "  "}), "model: Value error, must not be empty"),
        (passthrough({"model": "a\nb"}), "model: Value error, must not contain line breaks"),
        (
            {"merge_method": "block_expansion", "model": "m", "append": 1, "zero": [""]},
            "zero[0]: Value error, must not be empty",
        ),
        (
            passthrough(parameters={"scale": [{"filter": "", "value": 2.0}]}),
            "parameters.scale[0].filter: Value error, must not be empty",
        ),
        (
            {"merge_method": "ner", "base_model": "", "models": ["m"]},
            "base_model: must not be empty",
        ),
        ({"merge_method": ["passthrough"]}, "merge_method: expected a method name"),
        ({"merge_method": {"a": 1}}, "merge_method: expected a method name"),
    ],
)
def test_names_must_mean_something(tmp_path: Path, config: dict[str, Any], needle: str) -> None:
    refused(tmp_path, config, needle.replace("Value error, ", ""))


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (
            {"merge_method": "block_expansion", "model": "m", "append": 100_000_000},
            "append: Input should be less than or equal to 10000",
        ),
        (
            {"merge_method": "block_expansion", "model": "m", "interleave": 10**12},
            "interleave: Input should be less than or equal to 10000",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "m", "layer_range": [0, 5000]}]}] * 3,
            },
            "the slices add up to 15,000 layers, over 10,000",
        ),
    ],
)
def test_plan_sizes_are_bounded_before_any_model_is_opened(
    tmp_path: Path, config: dict[str, Any], needle: str
) -> None:
    refused(tmp_path, config, needle)


def test_an_expansion_bounded_by_the_models_depth(models: dict[str, Path], tmp_path: Path) -> None:
    """At the bound itself, the plan is made and refused by the model's own size, at once."""
    config = {
        "merge_method": "block_expansion",
        "model": str(models["llama"]),
        "interleave": 10_000,
    }
    refused(tmp_path, config, "interleave: 10000 exceeds the model's 4 layers")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"merge_method: passthrough\nslices: \xff\xfe\n", "not UTF-8 text (byte 34)"),
        ("merge_method: passthrough\nslices: " + "[" * 20_000 + "]" * 20_000, "nested too deeply"),
        ("merge_method: passthrough\nslices: " + "[" * 80 + "]" * 80, "nested too deeply"),
        (
            "merge_method: passthrough\n"
            + "".join(
                f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 10)
            ).replace("*x0", "1"),
            "values (with aliases expanded)",
        ),
        ("merge_method: passthrough\nslices: [" + "9" * 5000 + "]", "invalid YAML"),
        ("x" * 1_000_001, "more than a config"),
    ],
    ids=["not UTF-8", "deep", "deeper than 64", "alias bomb", "huge integer", "huge"],
)
def test_yaml_that_used_to_crash(tmp_path: Path, text: str | bytes, needle: str) -> None:
    refused(tmp_path, text, "c.yaml: ", needle)


@pytest.mark.parametrize(
    "device",
    ["banana", "cuda:x", "meta"]
    + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    + ([f"cuda:{torch.cuda.device_count()}"] if torch.cuda.is_available() else []),
)
def test_unknown_or_unavailable_devices(
    models: dict[str, Path], tmp_path: Path, device: str
) -> None:
    config = {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1}
    path = write_yaml(tmp_path / "c.yaml", config)
    assert_refused(tmp_path, path, f"--device {device}:", args=("--device", device))


def test_a_config_device_is_checked_before_any_model_is_opened(tmp_path: Path) -> None:
    config = {
        "merge_method": "olm",
        "models": ["./nowhere"],
        "dataset": {"d.json": {"mode": "exact"}},
        "device": "banana",
    }
    refused(tmp_path, config, "device: banana: not a torch device")


def test_every_worker_device_is_checked_before_any_model_is_opened(tmp_path: Path) -> None:
    config = {
        "merge_method": "olm",
        "models": ["./nowhere"],
        "dataset": {"d.json": {"mode": "exact"}},
        "devices": ["cpu", "banana"],
    }
    refused(tmp_path, config, "devices[1]: banana: not a torch device")


@pytest.mark.parametrize("ref", ["a/..", "org/name@../../etc", "../../x/..", "a/b--c"])
def test_hub_id_lookalikes_are_not_hub_ids(tmp_path: Path, ref: str) -> None:
    config = {"merge_method": "block_expansion", "model": ref, "append": 1}
    refused(tmp_path, config, f"{ref}: no such model folder")


def test_an_out_dir_under_a_file(models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1},
    )
    result = run_cli("merge", config, tmp_path / "file" / "sub" / "out")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: {tmp_path / 'file' / 'sub' / 'out'}: cannot be created: "
        f"{tmp_path / 'file'} is a file, not a folder"
    )
    assert (tmp_path / "file").read_text() == "x"


def test_a_planner_error_leaves_no_parent_folders(models: dict[str, Path], tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "interleave": 9},
    )
    result = run_cli("merge", config, tmp_path / "new" / "deeper" / "out")
    assert result.exit_code == 2 and "interleave: 9 exceeds" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_missing_card_template_is_reported_before_any_model_is_opened(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[object] = []
    monkeypatch.setattr("hubmerge.merge.open_sources", lambda *a, **k: opened.append(a))
    config = {
        "merge_method": "block_expansion",
        "model": str(models["llama"]),
        "append": 1,
        "card": {"template": "missing.md.j2"},
    }
    refused(tmp_path, config, "card.template: missing.md.j2: cannot read card template")
    assert opened == []
    # Without a card, the template does not matter.
    monkeypatch.undo()
    path = write_yaml(tmp_path / "c.yaml", config)
    assert run_cli("merge", path, tmp_path / "out", "--no-card").exit_code == 0


def test_valid_configs_still_pass() -> None:
    """The checks refuse the broken, not the usual: ints for scales, `*` filters, big models."""
    config = loads_config(
        "merge_method: passthrough\nslices:\n"
        "  - sources: [{model: m, layer_range: [0, 4000], parameters: {scale: 2}}]\n"
        "  - sources: [{model: m, layer_range: [4000, 10000]}]\n"
        "parameters: {scale: [{filter: '*', value: [0.5, 1]}, {value: 1}]}\n",
        "c",
    )
    assert config.slices[0].sources[0].parameters.scale == 2.0  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="c: nested too deeply"):
        loads_config("a: " + "[" * 100 + "]" * 100, "c")
