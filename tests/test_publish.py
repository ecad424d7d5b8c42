"""`hubmerge publish` against a Hub-compatible server: uploads, retries, errors, token hygiene."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from hubmerge.errors import HubError
from hubmerge.hub import publish
from hubmerge.merge import merge
from tests.helpers import run_cli, write_yaml
from tests.hubserver import TOKEN, HubServer, error_line, published_files

CARD = "---\nlicense: apache-2.0\ntags:\n- merge\n- hubmerge\n---\n# tiny merge\n"


@pytest.fixture(scope="module")
def merged(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A block-expanded tiny Llama with a card, a report and an image, as `publish` finds it."""
    root = tmp_path_factory.mktemp("merged")
    config = write_yaml(
        root / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1},
    )
    out = merge(config, root / "model").out_dir
    assert out is not None
    (out / "README.md").write_text(CARD)
    (out / "reports").mkdir()
    (out / "reports" / "eval.json").write_text('{"acc": 0.5}\n')
    (out / "images").mkdir()
    (out / "images" / "layers.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    (out / ".hubmerge_run.json").write_text("{}\n")  # local state: must stay local
    return out


@pytest.fixture
def model_dir(merged: Path, tmp_path: Path) -> Path:
    """A copy each test may change."""
    return Path(shutil.copytree(merged, tmp_path / "model"))


def test_publish_uploads_the_folder_byte_for_byte(
    model_dir: Path, hub: HubServer, models: dict[str, Path]
) -> None:
    result = publish(model_dir, "org/tiny-merge", endpoint=hub.url)

    stored = hub.repos["org/tiny-merge"]
    # Byte for byte, except that no local path of this machine reaches the Hub: recipes and
    # plans name the local donor by its folder name, as the card does.
    local = str(models["llama"]).encode()
    assert stored.files == published_files(model_dir)
    assert any(local in p.read_bytes() for p in model_dir.iterdir() if p.is_file())
    assert not any(
        local in v or str(Path.home()).encode() + b"/" in v for v in stored.files.values()
    )
    assert {"model.safetensors", "config.json", "mergekit_config.yml", "README.md"} <= set(
        stored.files
    )
    assert "images/layers.png" in stored.files and "reports/eval.json" in stored.files
    assert not stored.private
    assert result.url == f"{hub.url}/org/tiny-merge"
    assert result.commit_url and result.commit_url.startswith(result.url)
    assert result.frontmatter == {"license": "apache-2.0", "tags": ["merge", "hubmerge"]}
    assert len(stored.commits) == 1
    assert hub.unknown == []


def test_no_path_user_or_environment_of_this_machine_reaches_the_hub(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every uploaded text file: the folder's own path, the home folder, lm-eval's records."""
    home = tmp_path / "home" / "bob-k2"
    monkeypatch.setenv("HOME", str(home))
    folder = model_dir.absolute()
    (model_dir / "notes.md").write_text(f"merged in {folder}, donors in {home}/models.\n")
    results = json.loads((Path(__file__).parent / "data" / "lm_eval_leaderboard.json").read_text())
    results["config"]["model"] = f"{home}/merges/model"
    results["pretty_env_info"] = "Linux bob-k2 6.1, pip list: torch==2.13 ..."
    (model_dir / "results").mkdir()
    (model_dir / "results" / "leaderboard.json").write_text(json.dumps(results))
    vocabulary = json.dumps({f"{home}/x": 0, "hello": 1})  # tokens stay tokens
    (model_dir / "vocab.json").write_text(vocabulary)
    publish(model_dir, "org/clean", endpoint=hub.url)

    stored = hub.repos["org/clean"].files
    assert stored["notes.md"] == b"merged in model, donors in ~/models.\n"
    shared = json.loads(stored["results/leaderboard.json"])
    assert "pretty_env_info" not in shared and shared["config"]["model"] == "model"
    assert shared["results"] == results["results"]  # every number the card reads, as it was
    assert stored["vocab.json"] == vocabulary.encode()
    for name, data in stored.items():
        if name != "vocab.json":
            assert b"bob-k2" not in data and str(tmp_path).encode() not in data, name
    assert "bob-k2" in (model_dir / "results" / "leaderboard.json").read_text()  # kept locally


def test_cli_publish_prints_the_url_and_makes_private_repos(
    model_dir: Path, hub: HubServer
) -> None:
    result = run_cli("publish", model_dir, "--repo-id", "org/private-merge", "--private")
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/org/private-merge" in result.output
    assert hub.repos["org/private-merge"].private
    assert TOKEN not in result.output


def test_publishing_again_is_idempotent(model_dir: Path, hub: HubServer) -> None:
    publish(model_dir, "org/again")
    (model_dir / "README.md").write_text(CARD + "\nMore words.\n")
    publish(model_dir, "org/again")
    publish(model_dir, "org/again")  # nothing changed: no new commit

    stored = hub.repos["org/again"]
    assert stored.files == published_files(model_dir)
    assert len(stored.commits) == 2


def test_stale_weights_are_deleted_and_other_files_kept(model_dir: Path, hub: HubServer) -> None:
    """A re-merged model must never mix shards: weights the folder lost go, the rest stays."""
    shard = model_dir / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"old shard")
    (model_dir / "model.safetensors.index.json").write_text("{}")
    (model_dir / "notes.md").write_text("added by hand on the Hub, say\n")
    publish(model_dir, "org/remerged")
    for stale in (shard, model_dir / "model.safetensors.index.json", model_dir / "notes.md"):
        stale.unlink()
    publish(model_dir, "org/remerged")

    stored = hub.repos["org/remerged"].files
    assert stored == published_files(model_dir) | {"notes.md": b"added by hand on the Hub, say\n"}


def test_dry_run_lists_files_and_metadata_without_network(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no login either
    result = run_cli("publish", model_dir, "--repo-id", "org/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    for name in published_files(model_dir):
        assert name in result.output
    assert ".hubmerge_run.json" not in result.output
    assert "license: apache-2.0" in result.output and "- hubmerge" in result.output
    assert f"to {hub.url}/org/dry" in result.output
    assert hub.requests == []


def test_revision_goes_to_a_new_branch(model_dir: Path, hub: HubServer) -> None:
    result = run_cli("publish", model_dir, "--repo-id", "org/branchy", "--revision", "v2")
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/org/branchy/tree/v2" in result.output
    stored = hub.repos["org/branchy"]
    assert stored.refs["v2"] == published_files(model_dir)
    assert stored.files == {}


def test_create_pr_opens_a_pull_request(model_dir: Path, hub: HubServer) -> None:
    args = ["publish", model_dir, "--repo-id", "org/pr", "--create-pr", "--commit-message", "Hi"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/org/pr/discussions/1" in result.output
    stored = hub.repos["org/pr"]
    assert stored.refs["refs/pr/1"] == published_files(model_dir)
    assert stored.files == {}
    assert stored.commits[0]["summary"] == "Hi"


@pytest.mark.parametrize("path", ["/api/repos/create", "/commit/"])
def test_transient_failures_are_retried(model_dir: Path, hub: HubServer, path: str) -> None:
    hub.fail(path, 500)
    hub.fail(path, 503)
    result = run_cli("publish", model_dir, "--repo-id", "org/flaky")
    assert result.exit_code == 0, result.output
    assert hub.repos["org/flaky"].files == published_files(model_dir)
    assert sum(path in p for p in hub.paths()) == 3
    assert "retrying" in result.output


def test_retries_are_bounded(model_dir: Path, hub: HubServer) -> None:
    hub.fail("/commit/", 502, times=100)
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/down", "--token", TOKEN))
    assert "kept failing (HTTP 502, 6 tries)" in line and "resumes" in line
    assert sum("/commit/" in p for p in hub.paths()) == 6


def test_one_retry_layer_with_one_line_per_retry(
    model_dir: Path,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Preupload is retried by huggingface_hub itself: hubmerge does not retry it again, and
    the client's two lines per retry become hubmerge's one, with the documented waits.
    """
    waits: list[float] = []
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", waits.append)
    hub.fail("/preupload/", 500, times=10)
    result = run_cli("publish", model_dir, "--repo-id", "org/down")
    assert result.exit_code == 2
    assert sum("/preupload/" in p for p in hub.paths()) == 6  # 1 try + 5 retries, not 6 x 6
    retries = [line for line in result.output.splitlines() if "retrying" in line]
    assert retries == [
        f"org/down: HTTP 500 (try {n} of 6); retrying in {wait}s"
        for n, wait in enumerate((1, 2, 4, 8, 8), start=1)
    ]
    assert waits == [1, 2, 4, 8, 8]
    assert "kept failing (HTTP 500, 6 tries)" in result.output.splitlines()[-1]
    logged = capfd.readouterr().err + caplog.text
    assert "Retrying in" not in logged and "thrown while requesting" not in logged


def test_unchanged_is_said_once(
    model_dir: Path,
    hub: HubServer,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert run_cli("publish", model_dir, "--repo-id", "org/same").exit_code == 0
    result = run_cli("publish", model_dir, "--repo-id", "org/same")
    assert result.exit_code == 0 and "unchanged" in result.output
    logged = result.output + capfd.readouterr().err + caplog.text
    assert "No files have been modified" not in logged


def test_unreachable_hub_is_retried_then_reported(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError, match=r"kept failing \(ConnectError.*6 tries\)"):
        publish(model_dir, "org/nowhere")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, "the Hub refused the token (401"),
        (403, "no write access (403): use a token with write permission for org"),
        (404, "repository not found (404)"),
        (409, "conflict (409) (Hub: someone pushed): the repo or branch changed"),
    ],
)
def test_hub_errors_are_one_line_that_says_what_to_do(
    model_dir: Path, hub: HubServer, status: int, expected: str
) -> None:
    hub.fail("/commit/", status, message="someone pushed" if status == 409 else "")
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x"))
    assert expected in line
    assert sum("/commit/" in p for p in hub.paths()) == 1  # not retried


def test_metadata_the_hub_rejects_is_one_line(model_dir: Path, hub: HubServer) -> None:
    hub.fail("/api/validate-yaml", 400, message='"license" must be one of the Hub licenses')
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x"))
    assert 'refused the upload (400) (Hub: "license" must be one of the Hub licenses)' in line


def test_a_bad_token_is_refused_and_never_shown(model_dir: Path, hub: HubServer) -> None:
    bad = "hf_WrongToken42"
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x", "--token", bad))
    assert "refused the token (401" in line and "hf auth login" in line
    assert bad not in line


def test_the_token_is_scrubbed_from_hub_messages(model_dir: Path, hub: HubServer) -> None:
    hub.fail("/commit/", 409, message=f"token {TOKEN} conflicts")
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x"))
    assert "token *** conflicts" in line


def test_not_logged_in_fails_before_any_request(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x"))
    assert "not logged in" in line and "--token" in line
    assert hub.requests == []


@pytest.mark.parametrize("how", ["constant", "environment"])
def test_offline_mode_fails_at_once(
    model_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "constant":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x"))
    assert "HF_HUB_OFFLINE" in line
    assert time.monotonic() - start < 2
    assert hub.requests == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--repo-id", "no-namespace"], "expected ORG/NAME"),
        (["--repo-id", "org/bad name"], "repo id 'org/bad name'"),
        (["--repo-id", "org/x", "--revision", "dev", "--create-pr"], "exclude each other"),
    ],
)
def test_bad_arguments_fail_before_any_request(
    model_dir: Path, hub: HubServer, args: list[str], expected: str
) -> None:
    assert expected in error_line(run_cli("publish", model_dir, *args))
    assert hub.requests == []


def test_bad_folders_and_cards_fail_before_any_request(model_dir: Path, hub: HubServer) -> None:
    line = error_line(run_cli("publish", model_dir / "nope", "--repo-id", "org/x"))
    assert "no such model folder" in line
    line = error_line(run_cli("publish", model_dir / "images", "--repo-id", "org/x"))
    assert "not a model folder (no config.json)" in line
    (model_dir / "README.md").write_text("---\nlicense: [unclosed\n---\n# card\n")
    line = error_line(run_cli("publish", model_dir, "--repo-id", "org/x", "--dry-run"))
    assert "README.md: invalid YAML metadata" in line
    assert hub.requests == []


def test_a_folder_without_card_is_published_with_a_warning(model_dir: Path, hub: HubServer) -> None:
    (model_dir / "README.md").unlink()
    result = run_cli("publish", model_dir, "--repo-id", "org/bare")
    assert result.exit_code == 0, result.output
    assert "no README.md" in result.output
    assert hub.repos["org/bare"].files == published_files(model_dir)
