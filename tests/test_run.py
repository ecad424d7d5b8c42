"""`hubmerge run`: merge -> eval -> card -> publish against a Hub-compatible server, resumable."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import constants
from huggingface_hub.repocard import metadata_load

import hubmerge.evals
import hubmerge.merge
from hubmerge.card import render_card
from hubmerge.folder import EVAL_RESULTS_FILE, RUN_STATE_FILE
from tests.helpers import run_cli, write_yaml
from tests.hubserver import TOKEN, HubServer, error_line, published_files

ZOO_RESULTS = Path(__file__).parent / "data" / "lm_eval_zoo.json"
HUB = {"repo_id": "org/run-merge", "license": "mit", "tags": ["run-test"], "language": "en"}


@pytest.fixture
def config(models: dict[str, Path], tmp_path: Path) -> Path:
    """Block expansion of the tiny Llama, to be published as org/run-merge."""
    data = {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1}
    return write_yaml(tmp_path / "run.yaml", data | {"hub": HUB})


@pytest.fixture
def evals(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """lm-eval stood in for: "installed", its preflight passing, and `run_eval` writing recorded
    zoo results (or `RESULTS_WRITER`'s)."""
    fake = types.ModuleType("lm_eval")
    fake.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setattr(hubmerge.evals, "preflight", lambda tasks, **_: None)
    calls: list[dict[str, Any]] = []

    def run_eval(model_dir: Path, tasks: list[str], *, output: Path, **options: Any) -> Path:
        assert callable(options.pop("progress"))  # the CLI's progress bar
        calls.append({"tasks": list(tasks), **options})
        shutil.copyfile(ZOO_RESULTS, output)
        return output

    monkeypatch.setattr(hubmerge.evals, "run_eval", run_eval)
    return calls


def forbid_merging(monkeypatch: pytest.MonkeyPatch) -> None:
    def merge(*args: object, **kwargs: object) -> None:
        raise AssertionError("merged again")

    monkeypatch.setattr(hubmerge.merge, "merge", merge)


def assert_no_token(out: Path, hub: HubServer, *outputs: str) -> None:
    for text in outputs:
        assert TOKEN not in text
    for path in out.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    for repo in hub.repos.values():
        for name, data in repo.files.items():
            assert TOKEN.encode() not in data, name


def test_run_merges_cards_and_publishes(config: Path, hub: HubServer) -> None:
    result = run_cli("run", config, "out")
    assert result.exit_code == 0, result.output
    out = Path("out").absolute()
    assert f"published {hub.url}/org/run-merge" in result.output

    stored = hub.repos["org/run-merge"]
    assert stored.files == published_files(out)  # byte for byte, the card included
    assert {"model.safetensors", "config.json", "README.md", "layer_map.svg"} <= set(stored.files)
    assert RUN_STATE_FILE not in stored.files
    assert stored.files["README.md"].decode() == render_card(out)
    metadata = metadata_load(out / "README.md")
    assert metadata["license"] == "mit" and metadata["language"] == "en"
    assert {"merge", "hubmerge", "block_expansion", "run-test"} <= set(metadata["tags"])
    assert 'model_id = "org/run-merge"' in stored.files["README.md"].decode()  # loading code

    state = json.loads((out / RUN_STATE_FILE).read_text())
    assert list(state["stages"]) == ["merge", "card", "publish"]
    assert state["stages"]["publish"]["url"] == f"{hub.url}/org/run-merge"
    assert_no_token(out, hub, result.output)
    assert hub.unknown == []


def test_push_and_private_override_the_config(config: Path, hub: HubServer) -> None:
    result = run_cli("run", config, "out", "--push", "org/other-name", "--private")
    assert result.exit_code == 0, result.output
    assert "org/run-merge" not in hub.repos
    stored = hub.repos["org/other-name"]
    assert stored.private
    card = stored.files["README.md"].decode()
    assert 'model_id = "org/other-name"' in card and "org/run-merge" not in card


def test_eval_results_reach_the_card_and_the_hub(
    config: Path, hub: HubServer, evals: list[dict[str, Any]]
) -> None:
    result = run_cli("run", config, "out", "--eval", "hubmerge_zoo_add,hubmerge_zoo_count")
    assert result.exit_code == 0, result.output
    again = run_cli("run", config, "out", "--eval-preset", "zoo", "--limit", "8")
    assert again.exit_code == 0, again.output
    assert "merge: done in an earlier run" in again.output and "eval: running" in again.output
    assert evals == [
        {"tasks": ["hubmerge_zoo_add", "hubmerge_zoo_count"], "limit": None, "device": None},
        {"tasks": ["hubmerge_zoo"], "limit": 8, "device": None},
    ]
    out = Path("out").absolute()
    stored = hub.repos["org/run-merge"]
    # Published without lm-eval's record of this machine; the full file stays local.
    assert (out / EVAL_RESULTS_FILE).read_bytes() == ZOO_RESULTS.read_bytes()
    local, shared = json.loads(ZOO_RESULTS.read_text()), json.loads(stored.files[EVAL_RESULTS_FILE])
    assert "pretty_env_info" in local and "pretty_env_info" not in shared
    for key in ("results", "versions", "n-shot", "n-samples", "config", "date", "lm_eval_version"):
        assert shared[key] == local[key], key
    assert stored.files["README.md"].decode() == render_card(out, results=[out / EVAL_RESULTS_FILE])
    # The recorded results were limited to 8 documents per task: shown, not in model-index.
    assert "limited to 8 documents per task" in stored.files["README.md"].decode()
    assert "model-index" not in metadata_load(out / "README.md")


def test_published_eval_results_name_nothing_of_this_machine(
    config: Path,
    hub: HubServer,
    evals: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """lm-eval writes the model's path, its task files' paths and the machine's environment."""
    home = tmp_path / "home" / "alice-w7"
    monkeypatch.setenv("HOME", str(home))
    tasks_dir = Path(hubmerge.evals.TASKS_DIR).absolute()

    def like_lm_eval(model_dir: Path, tasks: list[str], *, output: Path, **_: Any) -> Path:
        data = json.loads(ZOO_RESULTS.read_text())
        data["config"] |= {"model": str(model_dir), "model_args": f"pretrained={model_dir},x=1"}
        for name, task in data["configs"].items():
            task["metadata"]["config_source"] = str(tasks_dir / f"{name}.yaml")
            task["dataset_kwargs"] = {"data_files": {"test": str(home / "data" / "t.json")}}
        data["pretty_env_info"] = f"user alice-w7, python {sys.prefix}, cwd {Path.cwd()}"
        data["git_hash"] = "0123abc"
        output.write_text(json.dumps(data, indent=2))
        return output

    monkeypatch.setattr(hubmerge.evals, "run_eval", like_lm_eval)
    result = run_cli("run", config, "out", "--eval-preset", "zoo")
    assert result.exit_code == 0, result.output

    out = Path("out").absolute()
    local = (out / EVAL_RESULTS_FILE).read_text()
    assert str(out) in local and "alice-w7" in local and "0123abc" in local  # all kept here
    stored = hub.repos["org/run-merge"]
    for name, data in stored.files.items():
        for secret in (str(tmp_path), "alice-w7", str(tasks_dir), sys.prefix, "0123abc"):
            assert secret.encode() not in data, (name, secret)
    shared = json.loads(stored.files[EVAL_RESULTS_FILE])
    assert shared["config"]["model"] == "out"
    assert shared["config"]["model_args"] == "pretrained=out,x=1"
    zoo_add = shared["configs"]["hubmerge_zoo_add"]
    assert zoo_add["metadata"]["config_source"] == "hubmerge/eval_tasks/hubmerge_zoo_add.yaml"
    assert zoo_add["dataset_kwargs"]["data_files"]["test"] == "t.json"
    # The card reads the same from the published copy as from the full file.
    copy = tmp_path / "published" / EVAL_RESULTS_FILE
    copy.parent.mkdir()
    copy.write_bytes(stored.files[EVAL_RESULTS_FILE])
    assert render_card(out, results=[out / EVAL_RESULTS_FILE]) == render_card(out, results=[copy])


def test_a_failed_upload_resumes_without_merging_again(
    config: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.fail("/commit/", 403)
    line = error_line(run_cli("run", config, "out"))
    assert "no write access (403)" in line
    out = Path("out")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert list(json.loads((out / RUN_STATE_FILE).read_text())["stages"]) == ["merge", "card"]
    assert hub.repos["org/run-merge"].files == {}

    forbid_merging(monkeypatch)
    result = run_cli("run", config, "out")
    assert result.exit_code == 0, result.output
    assert "merge: done in an earlier run" in result.output
    assert "card: done in an earlier run" in result.output
    assert weights.stat().st_mtime_ns == mtime
    assert hub.repos["org/run-merge"].files == published_files(out)
    assert_no_token(out, hub, result.output)


def test_a_finished_run_does_nothing_again(
    config: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("run", config, "out").exit_code == 0
    requests = len(hub.requests)
    forbid_merging(monkeypatch)
    result = run_cli("run", config, "out")
    assert result.exit_code == 0, result.output
    assert f"published {hub.url}/org/run-merge" in result.output
    assert len(hub.requests) == requests


def test_changed_hub_settings_rerun_card_and_publish_only(
    config: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("run", config, "out").exit_code == 0
    data = yaml.safe_load(config.read_text())
    data["hub"]["tags"] = ["run-test", "second"]
    write_yaml(config, data)
    forbid_merging(monkeypatch)
    result = run_cli("run", config, "out")
    assert result.exit_code == 0, result.output
    assert "card: running" in result.output and "publish: running" in result.output
    tags = metadata_load(Path("out/README.md"))["tags"]
    assert "second" in tags
    assert hub.repos["org/run-merge"].files == published_files(Path("out"))


def test_a_changed_merge_config_is_refused_unless_forced(config: Path, hub: HubServer) -> None:
    assert run_cli("run", config, "out").exit_code == 0
    data = yaml.safe_load(config.read_text())
    write_yaml(config, data | {"append": 2})
    line = error_line(run_cli("run", config, "out"))
    assert "was merged from a different config; pass --force" in line

    result = run_cli("run", config, "out", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(Path("out/config.json").read_text())["num_hidden_layers"] == 6
    assert hub.repos["org/run-merge"].files == published_files(Path("out"))


def test_an_existing_folder_not_made_by_run_is_refused(config: Path, hub: HubServer) -> None:
    Path("out").mkdir()
    line = error_line(run_cli("run", config, "out"))
    assert "not made by `hubmerge run` (pass --force" in line


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        ("offline", [], "HF_HUB_OFFLINE is set"),
        ("logged-out", [], "not logged in"),
        ("", ["--push", "nope"], "expected ORG/NAME"),
        ("", ["--eval", "a", "--eval-preset", "zoo"], "not both"),
        ("", ["--eval-preset", "nope"], "unknown preset 'nope'"),
        ("", ["--eval", "hubmerge_zoo_add"], "lm-eval is not installed (no module lm_eval)"),
    ],
)
def test_what_can_fail_fails_before_merging(
    config: Path,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed (whether it is or not)
    if setup == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if setup == "logged-out":
        monkeypatch.delenv("HF_TOKEN")
    forbid_merging(monkeypatch)
    assert expected in error_line(run_cli("run", config, "out", *args))
    assert not Path("out").exists()
    assert hub.requests == []


def test_a_refused_token_fails_before_merging(
    config: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight asks the Hub who the token belongs to, so a bad token costs no merge."""
    forbid_merging(monkeypatch)
    line = error_line(run_cli("run", config, "out", "--token", "hf_NotTheToken"))
    assert "org/run-merge: the Hub refused the token (401" in line
    assert "hf_NotTheToken" not in line
    assert not Path("out").exists()
    assert hub.paths() == ["/api/whoami-v2"]


def test_ctrl_c_says_what_was_kept_and_the_same_command_resumes(
    config: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hubmerge.card

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(hubmerge.card, "write_card", interrupt)
        result = run_cli("run", config, "out")
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        "interrupted: the finished stages (merge) are kept in out; run the same command "
        "again to resume after them"
    )
    forbid_merging(monkeypatch)
    again = run_cli("run", config, "out")
    assert again.exit_code == 0, again.output
    assert "merge: done in an earlier run" in again.output and "org/run-merge" in hub.repos


def test_without_a_repo_run_stops_at_the_card(
    models: dict[str, Path], hub: HubServer, tmp_path: Path
) -> None:
    data = {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1}
    result = run_cli("run", write_yaml(tmp_path / "local.yaml", data), "out")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (Path("out") / "README.md").is_file()
    assert list(json.loads(Path("out", RUN_STATE_FILE).read_text())["stages"]) == ["merge", "card"]
    assert hub.requests == []
