"""Bad input: one line naming the problem and where it is, exit code 2, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli, write_yaml


def slices(*ranges: tuple[str, int, int]) -> list[dict]:
    return [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in ranges]


def assert_refused(tmp_path: Path, config: Path, *needles: str, args: tuple[str, ...] = ()) -> None:
    result = run_cli("merge", config, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error:")
    for needle in needles:
        assert needle in message
    if "--force" not in args:
        assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"


def test_invalid_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("merge_method: passthrough\nslices: [\n  - sources: {\n")
    assert_refused(tmp_path, config, "c.yaml", "invalid YAML at line")


def test_unknown_method_and_missing_method(tmp_path: Path) -> None:
    assert_refused(
        tmp_path,
        write_yaml(tmp_path / "c.yaml", {"merge_method": "slerpy"}),
        "merge_method: unknown method 'slerpy'",
        "passthrough",
    )
    assert_refused(
        tmp_path, write_yaml(tmp_path / "c.yaml", {"slices": []}), "missing key merge_method"
    )


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "m", "layer_rnge": [0, 1]}]}],
            },
            "slices[0].sources[0].layer_rnge: unknown key (did you mean layer_range?)",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "m", "layer_range": [0, 1]}]}],
                "dtyp": "bfloat16",
            },
            "dtyp: unknown key",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "m", "layer_range": [3, 1]}]}],
            },
            "layer_range [3, 1] must satisfy",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": slices(("m", 0, 2), ("m", 2, 2), ("m", 2, 4)),
            },
            "slices[1]: layer_range [2, 2] is empty",
        ),
        (
            {"merge_method": "passthrough", "slices": slices(("m", 1, 1))},
            "the merge would have no layers",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [
                            {"model": "m", "layer_range": [0, 1], "parameters": {"scale": "big"}}
                        ]
                    }
                ],
            },
            "slices[0].sources[0].parameters.scale",
        ),
        (
            {"merge_method": "block_expansion", "model": "m", "append": 2, "interleave": 2},
            "exactly one of interleave",
        ),
        ({"merge_method": "block_expansion", "model": "m", "append": 0}, "append"),
    ],
)
def test_invalid_keys_and_values(tmp_path: Path, config: dict, needle: str) -> None:
    assert_refused(tmp_path, write_yaml(tmp_path / "c.yaml", config), needle)


def test_missing_model(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "c.yaml", {"merge_method": "passthrough", "slices": slices(("./nowhere", 0, 2))}
    )
    assert_refused(tmp_path, config, "./nowhere: no such model folder")


def test_layer_range_out_of_bounds(models: dict[str, Path], tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "passthrough",
            "slices": slices((str(models["llama"]), 0, 2), (str(models["llama"]), 2, 9)),
        },
    )
    assert_refused(
        tmp_path, config, "slices[1].sources[0].layer_range: [2, 9] is out of bounds", "(4 layers)"
    )


def test_incompatible_sources(models: dict[str, Path], tmp_path: Path) -> None:
    llama, wide, qwen = str(models["llama"]), str(models["wide"]), str(models["qwen2"])
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "passthrough", "slices": slices((llama, 0, 2), (wide, 2, 4))},
    )
    assert_refused(tmp_path, config, f"{wide}: hidden_size 48 differs from {llama}'s 32")
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "passthrough", "slices": slices((llama, 0, 2), (qwen, 2, 4))},
    )
    assert_refused(tmp_path, config, "architecture Qwen2ForCausalLM differs")


def test_unsupported_architecture(models: dict[str, Path], tmp_path: Path) -> None:
    import json

    odd = tmp_path / "odd"
    shutil.copytree(models["llama"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    config = write_yaml(
        tmp_path / "c.yaml", {"merge_method": "block_expansion", "model": "odd", "append": 1}
    )
    assert_refused(tmp_path, config, "odd: unsupported architecture ['GPT2LMHeadModel']")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(models: dict[str, Path], tmp_path: Path, damage: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    config = write_yaml(
        tmp_path / "c.yaml", {"merge_method": "passthrough", "slices": slices(("broken", 0, 2))}
    )
    needle = (
        "truncated or corrupt download" if damage == "truncate" else "not a readable safetensors"
    )
    assert_refused(tmp_path, config, "model.safetensors", needle)


def test_existing_output_needs_force(models: dict[str, Path], tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1},
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 2 and "already exists (pass --force" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run_cli("merge", config, tmp_path / "out", "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_failure_midway_leaves_nothing(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge that dies while writing removes its staging folder; a stale one is cleared."""
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1},
    )

    def boom(*args: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr("hubmerge.writer.transform", boom)
    with pytest.raises(KeyboardInterrupt):
        from hubmerge.merge import merge

        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    (tmp_path / ".out.partial-99999").mkdir()  # as if a run had been killed
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    assert not list(tmp_path.glob(".out.*"))
