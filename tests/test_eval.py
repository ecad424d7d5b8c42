"""`hubmerge eval`: a real, offline lm-eval run on a zoo model, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hubmerge
from hubmerge.errors import EvalError
from hubmerge.evals import LEADERBOARD_TASKS, resolve_tasks, run_eval
from tests.helpers import run_cli, write_yaml

ZOO_MODEL = Path(hubmerge.__file__).parent / "zoo" / "models" / "tiny-add"


def test_real_lm_eval_run_on_a_zoo_model_feeds_the_card(tmp_path: Path) -> None:
    """merge -> eval (shipped zoo tasks, offline, real lm-eval) -> card with the results."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[dev]'")
    config = {"merge_method": "block_expansion", "model": str(ZOO_MODEL), "append": 1}
    assert run_cli("merge", write_yaml(Path("c.yaml"), config), "out").exit_code == 0
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    command = [sys.executable, "-c", "from hubmerge.cli import main; main()", "eval", "out"]
    command += ["--tasks", "hubmerge_zoo_add,hubmerge_zoo_count", "--limit", "8", "-o", "r.json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(Path("r.json").read_text())
    add, count = results["results"]["hubmerge_zoo_add"], results["results"]["hubmerge_zoo_count"]
    assert results["n-samples"]["hubmerge_zoo_add"]["effective"] == 8
    # The expanded model computes what tiny-add does, and tiny-add was trained on addition.
    assert add["exact_match,strip"] >= 0.5
    assert 0.0 <= count["acc,none"] <= 1.0 and "acc_stderr,none" in count

    assert run_cli("card", "out", "--results", "r.json").exit_code == 0
    card = Path("out/README.md").read_text()
    assert "| hubmerge_zoo_add | 1.0 | strip | 0 | exact_match |" in card
    assert "limited to 8 documents per task" in card


def test_missing_lm_eval_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an absent package looks like
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    result = run_cli("eval", "m", "--tasks", "hubmerge_zoo_add", "-o", "r.json")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: lm-eval is not installed (no module lm_eval): pip install 'hubmerge[eval]'"
    )


def test_bad_eval_input() -> None:
    with pytest.raises(EvalError, match="absent: not a model folder"):
        run_eval(Path("absent"), ["hubmerge_zoo_add"], output=Path("r.json"))
    Path("m").mkdir()
    (Path("m") / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="no tasks to run"):
        run_eval(Path("m"), [], output=Path("r.json"))
    with pytest.raises(EvalError, match="--include-path nowhere: no such folder"):
        run_eval(Path("m"), ["x"], output=Path("r.json"), include_path=[Path("nowhere")])


def test_task_selection() -> None:
    assert resolve_tasks(["a,b", " c "], None) == ["a", "b", "c"]
    assert resolve_tasks([], "leaderboard") == list(LEADERBOARD_TASKS)
    assert len(LEADERBOARD_TASKS) == 6
    with pytest.raises(EvalError, match="not both"):
        resolve_tasks(["a"], "leaderboard")
    with pytest.raises(EvalError, match="unknown preset 'open'"):
        resolve_tasks([], "open")
