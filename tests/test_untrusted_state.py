"""What runs leave behind: a damaged OLM state file, and the folders of runs that were killed.

A saved OLM report cut short by a crash is refused in one line that says how to go on; the
hidden folders a killed run leaves (`.OUT.partial-PID`, `.OUT.replaced-PID`) are removed by the
next run once their process is gone, and a model a killed `--force` run had moved aside is put
back rather than lost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hubmerge.config import OlmConfig, parse_config
from hubmerge.errors import ConfigError
from hubmerge.methods.olm.report import load_report
from tests.helpers import run_cli, write_yaml
from tests.test_olm import olm_config

#: No process has this id (Linux's pid_max is at most 2**22).
DEAD = 2**22 + 1


@pytest.mark.parametrize(
    "saved",
    [b'{"version": 1, "fingerprint": "ab', b"", b"\xff\xfe", b"[]", b'{"version": 1, "layers": 3}'],
    ids=["truncated", "empty", "not UTF-8", "a list", "layers not a list"],
)
def test_a_damaged_olm_state_file_is_one_line(tmp_path: Path, saved: bytes) -> None:
    config = parse_config(olm_config(tmp_path), "c")
    assert isinstance(config, OlmConfig)
    path = tmp_path / "merge_report.json"
    path.write_bytes(saved)
    with pytest.raises(ConfigError, match="damaged .* pass --restart to discard it"):
        load_report(path, config, restart=False)
    assert load_report(path, config, restart=True).layers == []


def test_a_truncated_state_file_stops_the_merge_in_one_line(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "c.yaml", olm_config(tmp_path))
    work = tmp_path / ".out.work"
    work.mkdir()
    (work / "merge_report.json").write_text('{"version": 1, "fingerprint": "0123')
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "merge_report.json: the saved state of an unfinished OLM run is damaged" in lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.glob(".out.*")) == [".out.work"]  # kept: it is state


def expansion(models: dict[str, Path], tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1},
    )


def test_folders_of_killed_runs_are_removed(models: dict[str, Path], tmp_path: Path) -> None:
    config = expansion(models, tmp_path)
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    for kind in ("partial", "replaced"):  # as a run killed while writing, or while replacing
        stale = tmp_path / f".out.{kind}-{DEAD}"
        stale.mkdir()
        (stale / "model.safetensors").write_text("old")
    assert run_cli("merge", config, tmp_path / "out", "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_a_model_moved_aside_by_a_killed_run_is_put_back(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Killed between moving the old model aside and moving the new one in: nothing is lost."""
    config = expansion(models, tmp_path)
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    (tmp_path / "out").rename(tmp_path / f".out.replaced-{DEAD}")
    (tmp_path / f".out.partial-{DEAD}").mkdir()  # the new one, unfinished
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 2 and "already exists (pass --force" in result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_folders_that_are_not_hubmergess_are_left_alone(
    models: dict[str, Path], tmp_path: Path
) -> None:
    keep = tmp_path / ".out.partial-notes"
    keep.mkdir()
    assert run_cli("merge", expansion(models, tmp_path), tmp_path / "out").exit_code == 0
    assert keep.is_dir()
    shutil.rmtree(keep)
