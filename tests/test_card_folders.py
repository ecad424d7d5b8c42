"""`hubmerge card --all`: model folders kept in git (no weights), rendered or checked for CI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hubmerge.card import render_card
from hubmerge.card.folders import FolderReport, Status, log_lines
from hubmerge.merge import merge
from tests.helpers import run_cli, write_yaml

RESULTS = Path(__file__).parent / "data" / "lm_eval_zoo.json"


@pytest.fixture(autouse=True)
def _not_on_github(monkeypatch: pytest.MonkeyPatch) -> None:
    """hubmerge's own CI runs on GitHub Actions: output must not depend on that."""
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


@pytest.fixture(scope="module")
def merged(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`models/expanded/` as a model repository keeps it: config, results, outputs but weights."""
    root = tmp_path_factory.mktemp("repo")
    config = {
        "merge_method": "block_expansion",
        "model": str(models["llama"]),
        "append": 1,
        "hub": {"repo_id": "org/expanded"},
    }
    folder = root / "models" / "expanded"
    merge(write_yaml(root / "config.yaml", config), folder)
    shutil.move(root / "config.yaml", folder / "config.yaml")
    (folder / "results").mkdir()
    shutil.copy(RESULTS, folder / "results" / "zoo.json")
    return root


@pytest.fixture
def repo(merged: Path, tmp_path: Path) -> Path:
    """A copy each test may change, without weights, as a git checkout has it."""
    repo = Path(shutil.copytree(merged, tmp_path / "repo"))
    for weights in repo.glob("models/*/*.safetensors"):
        weights.unlink()
    return repo


def test_a_card_needs_no_weights(merged: Path, repo: Path) -> None:
    with_weights = render_card(merged / "models" / "expanded")
    assert list((merged / "models" / "expanded").glob("*.safetensors"))
    assert render_card(repo / "models" / "expanded") == with_weights


def test_all_renders_with_the_results_then_is_fresh(repo: Path) -> None:
    result = run_cli("card", "--all", repo / "models")
    assert result.exit_code == 0, result.output
    assert f"updated {repo}/models/expanded: README.md" in result.output
    assert "| hubmerge_zoo_count |" in (repo / "models/expanded/README.md").read_text()

    result = run_cli("card", "--all", repo / "models", "--check")
    assert result.exit_code == 0, result.output
    assert f"fresh   {repo}/models/expanded" in result.output
    assert "1 model folders: 1 fresh" in result.output


def test_a_stale_card_fails_the_check_with_a_diff(repo: Path) -> None:
    run_cli("card", "--all", repo / "models")
    card = repo / "models/expanded/README.md"
    card.write_text(card.read_text().replace("## Method", "## How it was made"))

    result = run_cli("card", "--all", repo / "models", "--check")
    assert result.exit_code == 1, result.output
    assert f"stale   {repo}/models/expanded: README.md" in result.output
    assert "-## How it was made\n+## Method" in result.output
    assert f"`hubmerge card --all {repo}/models`" in result.output
    assert "::error" not in result.output  # only on GitHub Actions
    assert "How it was made" in card.read_text()  # a check writes nothing


def test_on_github_actions_problems_are_annotations(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = run_cli("card", "--all", repo / "models", "--check")
    assert result.exit_code == 1, result.output
    folder = f"{repo}/models/expanded"
    assert (
        f"::error file={folder}/README.md,title=Stale model card::stale: README.md; "
        f"run `hubmerge card --all {folder}` and commit the result"
    ) in result.output

    result = run_cli("card", "--all", repo / "models")
    assert f"::warning file={folder}/README.md,title=Model card re-rendered::" in result.output


def test_config_yaml_feeds_the_card(repo: Path) -> None:
    """The user edits config.yaml: its hub: and card: sections reach hubmerge_config.yml."""
    run_cli("card", "--all", repo / "models")
    config = repo / "models/expanded/config.yaml"
    config.write_text(config.read_text() + "card: {summary: Edited in git.}\n")

    result = run_cli("card", "--all", repo / "models", "--check")
    assert result.exit_code == 1, result.output
    assert "stale   " in result.output and ": hubmerge_config.yml" in result.output
    assert "+  summary: Edited in git." in result.output

    result = run_cli("card", "--all", repo / "models")
    assert "hubmerge_config.yml, README.md" in result.output
    assert "Edited in git." in (repo / "models/expanded/README.md").read_text()


def test_a_config_that_changes_the_merge_is_an_error(repo: Path) -> None:
    config = repo / "models/expanded/config.yaml"
    config.write_text(config.read_text().replace("append: 1", "append: 2"))
    result = run_cli("card", "--all", repo / "models", "--check")
    assert result.exit_code == 2, result.output
    assert "append changed since the merge" in result.output
    assert "hubmerge merge" in result.output


def test_a_broken_folder_does_not_hide_the_others(repo: Path) -> None:
    shutil.copytree(repo / "models/expanded", repo / "models/broken")
    (repo / "models/broken/hubmerge_sources.json").unlink()
    (repo / "models/notes").mkdir()  # not a model folder: ignored

    result = run_cli("card", "--all", repo / "models")
    assert result.exit_code == 2, result.output
    assert f"error   {repo}/models/broken: broken: no hubmerge_sources.json" in result.output
    assert f"updated {repo}/models/expanded" in result.output
    assert "notes" not in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--all", "models", "models/expanded"], "no MODEL_DIR, --results, -o or --repo-id"),
        (["--all", "models", "--results", "r.json"], "no MODEL_DIR, --results, -o or --repo-id"),
        ([], "give MODEL_DIR, or --all DIR"),
        (["--all", "nowhere"], "nowhere: no such folder"),
        (["--all", "."], "no model folders in it"),
    ],
)
def test_bad_usage_is_one_line(
    repo: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    monkeypatch.chdir(repo)
    result = run_cli("card", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_annotations_escape_what_workflow_commands_reserve() -> None:
    report = FolderReport(Path("odd,name:1"), Status.ERROR, error="50% broken\nsecond line")
    assert log_lines(report, annotate=True) == [
        "error   odd,name:1: 50% broken\nsecond line",
        "::error file=odd%2Cname%3A1,title=Model card error::50%25 broken%0Asecond line",
    ]
