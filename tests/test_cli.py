"""The `hubmerge` command's own manners: its version, the plan table, and Ctrl-C."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import hubmerge.merge
from hubmerge import __version__
from hubmerge.config import OlmConfig
from hubmerge.methods.base import Context
from tests.helpers import run_cli, write_yaml


def test_version() -> None:
    result = run_cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"hubmerge {__version__}"


def stack(models: dict[str, Path], tmp_path: Path) -> Path:
    """36 layers: the 12-layer Llama three times, then two layers of the 4-layer one."""
    slices = [{"sources": [{"model": str(models["llama12"]), "layer_range": [0, 12]}]}] * 3
    slices.append({"sources": [{"model": str(models["llama"]), "layer_range": [1, 3]}]})
    return write_yaml(tmp_path / "stack.yaml", {"merge_method": "passthrough", "slices": slices})


def table_rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in output.splitlines()
        if line.startswith("│")
    ]


def test_the_plan_table_names_models_as_the_card_does(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Local models by their folder's name (never a path cut to a prefix they all share), runs
    of layers taken in order from one model as one row; `--verbose` shows every layer by path.
    """
    config = stack(models, tmp_path)
    result = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert str(tmp_path) not in result.output
    assert table_rows(result.output) == [
        ["embed", "llama12", "-", "1.0"],
        ["0-11", "llama12", "0-11", "1.0"],
        ["12-23", "llama12", "0-11", "1.0"],
        ["24-35", "llama12", "0-11", "1.0"],
        ["36", "llama", "1", "1.0"],
        ["37", "llama", "2", "1.0"],
        ["head", "llama", "-", "1.0"],
    ]
    verbose = run_cli("merge", config, tmp_path / "out", "--dry-run", "--verbose")
    assert verbose.exit_code == 0, verbose.output
    assert len(table_rows(verbose.output)) >= 40  # every layer (long paths wrap onto more)
    assert str(models["llama12"].parent)[:20] in verbose.output


def test_ctrl_c_in_merge_says_nothing_was_written(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(hubmerge.merge, "write_model", interrupt)
    result = run_cli("merge", stack(models, tmp_path), "out")
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        "interrupted: nothing was written (out is as it was); run the same command again to "
        "start over"
    )
    assert [p.name for p in Path().iterdir()] == ["stack.yaml"]  # no output, no staging


def test_ctrl_c_in_olm_keeps_the_search_and_the_same_command_resumes(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hubmerge.methods.olm as olm

    def searching(config: OlmConfig, sources: object, context: Context) -> None:
        assert context.work_dir is not None
        context.work_dir.mkdir()
        (context.work_dir / "merge_report.json").write_text(json.dumps({"layers": []}))
        raise KeyboardInterrupt  # as if pressed during the search

    monkeypatch.setattr(olm, "METHOD", replace(olm.METHOD, planner=searching))
    (tmp_path / "data.json").write_text("[]")
    config = {
        "merge_method": "olm",
        "models": [str(models["llama"]), str(models["llama_b"])],
        "dataset": {str(tmp_path / "data.json"): {"mode": "exact"}},
    }
    result = run_cli("merge", write_yaml(tmp_path / "olm.yaml", config), "out")
    assert result.exit_code == 130
    work = (tmp_path / ".out.work").resolve()
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted: the OLM search so far is kept in {work}; run the same command again to "
        "resume it"
    )
    assert (work / "merge_report.json").is_file() and not Path("out").exists()


def test_ctrl_c_in_demo_says_what_was_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import hubmerge.demo

    def measuring(out_dir: Path, **kwargs: object) -> None:
        Path(out_dir).mkdir()  # merged; interrupted while the models are compared
        raise KeyboardInterrupt

    monkeypatch.setattr(hubmerge.demo, "run_demo", measuring)
    result = run_cli("demo", "demo-out")
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        "interrupted: the merged model is kept in demo-out; `hubmerge demo demo-out --force` "
        "merges and compares again"
    )
