"""What CI publishing needs from `hubmerge publish`, against a Hub-compatible server: the card
alone (`--card-only`), no commit when nothing changed, the repo id from the folder's config, no
weightless folder, and tokens from the Hub's Trusted Publishers (`--oidc`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from hubmerge.hub import publish
from hubmerge.merge import merge
from tests.helpers import run_cli, write_yaml
from tests.hubserver import (
    GITHUB_REQUEST_TOKEN,
    TOKEN,
    HubServer,
    error_line,
    github_id_token,
    published_files,
)

REPO = "org/tiny"


@pytest.fixture
def model_dir(models: dict[str, Path], tmp_path: Path) -> Path:
    """A merged model whose config names its Hub repo, with its card and layer map."""
    config = {
        "merge_method": "block_expansion",
        "model": str(models["llama"]),
        "append": 1,
        "hub": {"repo_id": REPO},
    }
    out = merge(write_yaml(tmp_path / "c.yaml", config), tmp_path / "model").out_dir
    assert out is not None
    return out


def test_card_only_uploads_the_card_and_keeps_the_model(model_dir: Path, hub: HubServer) -> None:
    publish(model_dir, REPO)
    card = (model_dir / "README.md").read_text() + "\nA new paragraph.\n"
    (model_dir / "README.md").write_text(card)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()  # a git checkout of the folder has none

    result = run_cli("publish", model_dir, "--card-only")
    assert result.exit_code == 0, result.output
    assert f"published the card of {hub.url}/{REPO}" in result.output
    stored = hub.repos[REPO]
    assert stored.files["README.md"].decode() == card
    assert "model.safetensors" in stored.files  # nothing deleted
    assert len(stored.commits) == 2


def test_card_only_dry_run_lists_the_card_and_its_image(model_dir: Path, hub: HubServer) -> None:
    result = run_cli("publish", model_dir, "--card-only", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would upload 2 files" in result.output
    assert "README.md" in result.output and "layer_map.svg" in result.output
    assert hub.requests == []


@pytest.mark.parametrize("card_only", [False, True])
def test_nothing_changed_makes_no_commit(model_dir: Path, hub: HubServer, card_only: bool) -> None:
    publish(model_dir, REPO)
    result = run_cli("publish", model_dir, *(["--card-only"] if card_only else []))
    assert result.exit_code == 0, result.output
    assert f"unchanged {hub.url}/{REPO}" in result.output
    assert len(hub.repos[REPO].commits) == 1
    assert hub.repos[REPO].files == published_files(model_dir)


def test_card_only_needs_the_repo_and_a_card(model_dir: Path, hub: HubServer) -> None:
    line = error_line(run_cli("publish", model_dir, "--card-only"))
    assert "repository not found (404)" in line
    assert REPO not in hub.repos  # a card alone never creates a repo
    (model_dir / "README.md").unlink()
    assert "no README.md to publish" in error_line(run_cli("publish", model_dir, "--card-only"))


def test_a_folder_without_weights_is_refused(model_dir: Path, hub: HubServer) -> None:
    """Publishing it whole would delete the model's weights on the Hub."""
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    line = error_line(run_cli("publish", model_dir))
    assert "no weights" in line and "--card-only" in line
    assert hub.requests == []


def test_the_repo_comes_from_the_folders_config(model_dir: Path, hub: HubServer) -> None:
    result = run_cli("publish", model_dir)
    assert result.exit_code == 0, result.output
    assert hub.repos[REPO].files == published_files(model_dir)

    (model_dir / "hubmerge_config.yml").write_text(
        "merge_method: block_expansion\nmodel: x\nappend: 1\n"
    )
    line = error_line(run_cli("publish", model_dir))
    assert "no hub.repo_id in its config: pass --repo-id" in line


@pytest.mark.parametrize("identity", ["github", "HF_OIDC_ID_TOKEN"])
def test_trusted_publishing_exchanges_the_ci_identity(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, identity: str
) -> None:
    """No HF_TOKEN: the job's OIDC identity is exchanged for a token scoped to the repo."""
    repo = f"org/trusted-{identity.lower()}"  # the client caches exchanged tokens per repo
    monkeypatch.delenv("HF_TOKEN")
    if identity == "github":  # what GitHub Actions sets with `permissions: id-token: write`
        monkeypatch.setenv("GITHUB_ACTIONS", "true")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"{hub.url}/_github/oidc?v=2.0")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", GITHUB_REQUEST_TOKEN)
    else:  # any other CI: the job mints the id token and hands it over
        monkeypatch.setenv("HF_OIDC_ID_TOKEN", github_id_token(hub.url))
    hub.trusted_publishers[repo] = github_id_token(hub.url)  # the audience is the Hub

    result = run_cli("publish", model_dir, "--repo-id", repo, "--oidc")
    assert result.exit_code == 0, result.output
    stored = dict(hub.repos[repo].files)
    assert f'model_id = "{repo}"'.encode() in stored.pop("README.md")  # the card for the repo
    expected = published_files(model_dir)
    del expected["README.md"]
    assert stored == expected
    assert "/oauth/token" in hub.paths("POST")
    assert TOKEN not in result.output
    assert "HF_OIDC_RESOURCE" not in os.environ  # set for the exchange only


def test_trusted_publishing_errors_are_one_line(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("HF_OIDC_ID_TOKEN", raising=False)
    args = ["publish", model_dir, "--repo-id", "org/untrusted", "--oidc"]
    assert "no OIDC identity to exchange" in error_line(run_cli(*args))

    monkeypatch.setenv("HF_OIDC_ID_TOKEN", "an-identity-no-publisher-trusts")
    line = error_line(run_cli(*args))
    assert "refused the OIDC token exchange (400)" in line and "Trusted Publisher" in line
    assert "org/untrusted" not in hub.repos

    line = error_line(run_cli(*args, "--token", TOKEN))
    assert "--token and --oidc exclude each other" in line


@pytest.fixture
def unnamed(models: dict[str, Path], tmp_path: Path) -> Path:
    """A merged model whose config names no repo: its card is for the folder's name."""
    config = {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1}
    out = merge(write_yaml(tmp_path / "u.yaml", config), tmp_path / "folder-name").out_dir
    assert out is not None
    return out


def test_the_published_card_is_rendered_for_the_repo(unnamed: Path, hub: HubServer) -> None:
    """`--repo-id` elsewhere than the card names: the card that reaches the Hub loads the model
    from there; the folder's own card stays as it was.
    """
    on_disk = (unnamed / "README.md").read_text()
    assert 'model_id = "folder-name"' in on_disk
    result = run_cli("publish", unnamed, "--repo-id", "you/new-name")
    assert result.exit_code == 0, result.output
    card = hub.repos["you/new-name"].files["README.md"].decode()
    assert card.startswith("---\n") and "\n# new-name\n" in card
    assert 'model_id = "you/new-name"' in card and "folder-name" not in card
    assert (unnamed / "README.md").read_text() == on_disk
    # Published there again: the same card, so nothing changes.
    assert "unchanged" in run_cli("publish", unnamed, "--repo-id", "you/new-name").output


def test_dry_run_shows_the_metadata_of_the_card_for_the_repo(unnamed: Path, hub: HubServer) -> None:
    """With results, the card's metadata names the model (model-index): the dry run shows the
    metadata of the card that would be published, named for the repo.
    """
    (unnamed / "results").mkdir()
    results = unnamed / "results" / "leaderboard.json"
    results.write_bytes((Path(__file__).parent / "data" / "lm_eval_leaderboard.json").read_bytes())
    assert run_cli("card", unnamed, "--results", results).exit_code == 0
    result = run_cli("publish", unnamed, "--repo-id", "you/scored", "--dry-run")
    assert result.exit_code == 0, result.output
    metadata = yaml.safe_load(result.output.split("README.md metadata:")[1])
    assert metadata["model-index"][0]["name"] == "you/scored"
    assert hub.requests == []


def test_a_card_for_another_model_that_cannot_be_rendered_again_is_refused(
    unnamed: Path, hub: HubServer
) -> None:
    card = unnamed / "README.md"
    card.write_text(card.read_text() + "\nWritten by hand.\n")
    line = error_line(run_cli("publish", unnamed, "--repo-id", "you/x"))
    assert "usage snippet loads 'folder-name', not you/x" in line
    assert f"hubmerge card {unnamed} --repo-id you/x" in line
    assert "you/x" not in hub.repos
    assert run_cli("card", unnamed, "--repo-id", "you/x").exit_code == 0
    assert run_cli("publish", unnamed, "--repo-id", "you/x").exit_code == 0
    assert 'model_id = "you/x"' in hub.repos["you/x"].files["README.md"].decode()
