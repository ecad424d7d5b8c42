"""`hubmerge eval`: a real, offline lm-eval run on a zoo model, its preflight and its errors."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hubmerge
import hubmerge.evals
from hubmerge.errors import EvalError
from hubmerge.evals import (
    LEADERBOARD_TASKS,
    PRESETS,
    TASKS_DIR,
    model_arguments,
    preflight,
    resolve_tasks,
    run_eval,
)
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
    # None of lm-eval's noise (hints, git, tqdm bars, log lines); the scores, as the card has them.
    for noise in ("--metadata", "fatal:", "it/s]", "%|", "WARNING", "INFO"):
        assert noise not in done.stdout + done.stderr
    assert "hubmerge_zoo_add" in done.stdout and "exact_match" in done.stdout
    assert "limited to 8 documents per task" in done.stdout
    assert done.stdout.rstrip().endswith("wrote r.json")

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


@pytest.fixture(scope="module")
def task_manager() -> Any:
    """lm-eval's full task index, built once (about 20 s) for the preflight tests."""
    tasks = pytest.importorskip("lm_eval.tasks", reason="lm-eval is not installed")
    return tasks.TaskManager(include_path=[str(TASKS_DIR)])


@pytest.fixture
def offline_tasks(
    task_manager: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """Preflight with the prebuilt index, and IFEval's nltk data present, so nothing downloads."""
    import lm_eval.tasks
    import nltk

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **_: task_manager)
    (tmp_path / "nltk" / "tokenizers" / "punkt_tab").mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk")])
    yield


def forget_task_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make lm-eval import its task code again, as a fresh process would."""
    for name in [n for n in sys.modules if n.startswith("lm_eval.tasks.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_passes_the_preflight_import_check(preset: str, offline_tasks: None) -> None:
    """What `pip install 'hubmerge[eval]'` installs runs every preset's task code."""
    manager = preflight(PRESETS[preset])
    assert all(task in manager.all_tasks for task in PRESETS[preset])


@pytest.mark.parametrize(
    ("task", "module", "extra"),
    [
        ("leaderboard_ifeval", "langdetect", "ifeval"),
        ("leaderboard_math_hard", "math_verify", "math"),
    ],
)
def test_a_package_a_task_imports_is_one_line_naming_the_extra(
    task: str, module: str, extra: str, offline_tasks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_task_code(monkeypatch)
    monkeypatch.setitem(sys.modules, module, None)  # what a package not installed looks like
    with pytest.raises(EvalError) as error:
        preflight(["leaderboard_bbh", task])
    assert str(error.value) == (
        f"task {task} needs the Python package {module} (lm-eval's `{extra}` extra): "
        "pip install 'hubmerge[eval]'"
    )


def test_a_task_outside_the_presets_names_lm_evals_extra(
    offline_tasks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_task_code(monkeypatch)
    monkeypatch.setitem(sys.modules, "langdetect", None)
    with pytest.raises(EvalError, match=r"^task ifeval needs .*: pip install 'lm-eval\[ifeval\]'$"):
        preflight(["ifeval"])


def test_model_arguments_are_lm_evals_own() -> None:
    from lm_eval.utils import simple_parse_args_string

    args = model_arguments(Path("/m/out"), "vllm", "tensor_parallel_size=2, max_model_len=4096")
    assert args == "pretrained=/m/out,tensor_parallel_size=2,max_model_len=4096"
    parsed = simple_parse_args_string(args)
    assert parsed == {
        "pretrained": "/m/out",
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
    }
    # Names lm-eval's VLLM takes (read from its source: importing it needs vllm).
    import lm_eval.models

    source = Path(lm_eval.models.__file__).parent / "vllm_causallms.py"
    init = next(
        node
        for cls in ast.parse(source.read_text()).body
        if isinstance(cls, ast.ClassDef) and cls.name == "VLLM"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    accepted = {a.arg for a in init.args.args + init.args.kwonlyargs}
    assert {*parsed, "batch_size"} <= accepted  # (its `device` is CUDA_VISIBLE_DEVICES)
    assert model_arguments(Path("m"), "hf", "dtype=bfloat16") == "pretrained=m,dtype=bfloat16"
    with pytest.raises(EvalError, match="no pretrained=: the model is MODEL_DIR"):
        model_arguments(Path("m"), "hf", "pretrained=other")
    with pytest.raises(EvalError, match="'dtype' is not key=value"):
        model_arguments(Path("m"), "hf", "dtype")
    with pytest.raises(EvalError, match="unknown backend 'tgi'"):
        model_arguments(Path("m"), "tgi")


def test_vllm_runs_through_lm_evals_vllm_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--backend vllm` hands lm-eval the model type and arguments; vllm itself is not run."""
    import lm_eval

    calls: list[dict[str, Any]] = []

    def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"results": {}}

    monkeypatch.setattr(hubmerge.evals, "preflight", lambda tasks, **_: "manager")
    monkeypatch.setattr(hubmerge.evals, "_quiet", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    Path("m").mkdir()
    (Path("m") / "config.json").write_text("{}")
    result = run_cli(
        "eval",
        "m",
        "--preset",
        "leaderboard",
        "--backend",
        "vllm",
        "--model-args",
        "tensor_parallel_size=2",
        "-o",
        "r.json",
    )
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert (call["model"], call["model_args"]) == ("vllm", "pretrained=m,tensor_parallel_size=2")
    assert (call["batch_size"], call["device"], call["task_manager"]) == ("auto", None, "manager")
    assert call["tasks"] == list(LEADERBOARD_TASKS)
    assert json.loads(Path("r.json").read_text()) == {"results": {}}


def test_vllm_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    monkeypatch.setitem(sys.modules, "vllm", None)
    Path("m").mkdir()
    (Path("m") / "config.json").write_text("{}")
    result = run_cli(
        "eval", "m", "--tasks", "hubmerge_zoo_add", "--backend", "vllm", "-o", "r.json"
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --backend vllm needs vllm, which is not installed: pip install 'hubmerge[vllm]' "
        "(Linux with an NVIDIA GPU)"
    )
    assert not Path("r.json").exists()
