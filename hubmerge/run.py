"""`hubmerge run`: merge, evaluate, write the card and publish, in one resumable command.

Each finished stage is recorded in OUT_DIR/.hubmerge_run.json with a key made from its inputs
and the key of the stage before it, so a stage is skipped exactly when it already ran on the
same inputs after the same earlier stages. A run that failed (say, at the upload) resumes at
the failed stage when run again, without merging again; other eval tasks, or changed `hub:` or
`card:` settings, rerun only the stages from there on.

A changed merge config is refused rather than silently merged again: OUT_DIR holds a model that
may have taken hours to build, so replacing it takes `force=True` (`--force`). The state file
holds no token and stays local (see `hub.LOCAL_ONLY_PATTERNS`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmerge import hub
from hubmerge.config import HubSettings, MergeConfig, load_config
from hubmerge.errors import OutputError
from hubmerge.folder import (
    EVAL_RESULTS_FILE,
    RUN_STATE_FILE,
    atomic_write,
    json_text,
    merge_fingerprint,
    write_config,
)

if TYPE_CHECKING:  # the merge engine (and torch) load only when a merge runs
    from hubmerge.evals import Counter
    from hubmerge.methods.base import Reporter
    from hubmerge.writer import Progress

_STATE_VERSION = 1


@dataclass
class RunResult:
    out_dir: Path
    #: Stages run now, and stages skipped because an earlier run finished them.
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: The model's Hub page (published now or by an earlier run); None without publishing.
    url: str | None = None


@dataclass(frozen=True)
class _Stage:
    name: str
    key: str
    #: Does the work; returns details to record (never a secret).
    action: Callable[[], dict[str, Any]]


def run(
    config_path: Path,
    out_dir: Path,
    *,
    tasks: Sequence[str] = (),
    preset: str | None = None,
    limit: int | None = None,
    push: str | None = None,
    private: bool = False,
    token: str | None = None,
    force: bool = False,
    device: str | None = None,
    endpoint: str | None = None,
    retry: hub.RetryPolicy | None = None,
    progress: Progress | None = None,
    reporter: Reporter | None = None,
    eval_progress: Counter | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> RunResult:
    """Build the model `config_path` describes into `out_dir`, evaluate, card and publish it.

    Evaluation runs when `tasks` or `preset` is given (`eval_progress` starts its bar).
    Publishing runs when `push` or the config's `hub.repo_id` names a repo; `push` and
    `private` override the config's `hub:` settings, and the card is written from the settings
    in effect. Whatever can fail without a merge (config, tasks, lm-eval and every package the
    tasks import, repo id, offline mode, the token, which the Hub is asked about) is checked
    first.
    """
    from hubmerge import evals

    out_dir = Path(out_dir).absolute()
    config = _with_overrides(load_config(Path(config_path)), push, private)
    eval_tasks = evals.resolve_tasks(tasks, preset)
    if eval_tasks:
        # lm-eval, the tasks and every package their code imports: found out now, not after
        # a merge that may take hours.
        evals.preflight(eval_tasks)
    settings = config.hub or HubSettings()
    if settings.repo_id:
        hub.check_repo_id(settings.repo_id)
        hub.check_online()
        token = hub.resolve_token(token)

    fingerprint = merge_fingerprint(config)
    recorded = _load_state(out_dir, fingerprint, force=force)

    def do_merge() -> dict[str, Any]:
        from hubmerge.merge import merge

        # No card yet: the card stage writes it, with the results of the eval stage.
        merge(
            config,
            out_dir,
            force=force,
            device=device,
            progress=progress,
            reporter=reporter,
            card=False,
        )
        return {}

    def do_eval() -> dict[str, Any]:
        from hubmerge.evals import run_eval

        run_eval(
            out_dir,
            eval_tasks,
            output=out_dir / EVAL_RESULTS_FILE,
            limit=limit,
            device=device,
            progress=eval_progress,
        )
        return {"tasks": eval_tasks, "limit": limit, "results": EVAL_RESULTS_FILE}

    def do_card() -> dict[str, Any]:
        from hubmerge.card import write_card

        # The card reads `hub:` and `card:` from the config in the folder: bring it up to date.
        write_config(config, out_dir)
        write_card(out_dir, results=[out_dir / EVAL_RESULTS_FILE] if eval_tasks else [])
        return {}

    def do_publish() -> dict[str, Any]:
        assert settings.repo_id is not None  # this stage exists only with a repo
        published = hub.publish(
            out_dir,
            settings.repo_id,
            private=settings.private,
            token=token,
            endpoint=endpoint,
            retry=retry,
            log=log,
        )
        return {"repo_id": settings.repo_id, "url": published.url}

    stages = [_Stage("merge", fingerprint, do_merge)]
    if eval_tasks:
        stages.append(_Stage("eval", _chain(stages, eval_tasks, limit), do_eval))
    elif "eval" in recorded:
        # An earlier run's results would otherwise be published beside a card without them.
        (out_dir / EVAL_RESULTS_FILE).unlink(missing_ok=True)
    sections = config.model_dump(mode="json", include={"hub", "card"})
    stages.append(_Stage("card", _chain(stages, sections), do_card))
    if settings.repo_id:
        stages.append(_Stage("publish", _chain(stages, settings.repo_id), do_publish))

    # With a repo, `resolve_token` gave a token (or raised): the Hub is asked about it now,
    # unless it was published already, not after a merge that may take hours.
    if settings.repo_id and token and recorded.get("publish", {}).get("key") != stages[-1].key:
        hub.check_token(settings.repo_id, token, endpoint=endpoint, retry=retry, log=log)

    result = RunResult(out_dir)
    done: dict[str, Any] = {}
    for stage in stages:
        # Keys chain, so a stage that must run again changes the keys of every stage after it.
        if recorded.get(stage.name, {}).get("key") == stage.key:
            log(f"{stage.name}: done in an earlier run")
            result.skipped.append(stage.name)
            done[stage.name] = recorded[stage.name]
            continue
        log(f"{stage.name}: running")
        done[stage.name] = {"key": stage.key, **stage.action(), "finished": _now()}
        _save_state(out_dir, fingerprint, done)
        result.ran.append(stage.name)
    if "publish" in done:
        result.url = done["publish"]["url"]
    return result


def finished_stages(out_dir: Path) -> list[str]:
    """The stages a run into `out_dir` has finished, in order (none when it has no state)."""
    try:
        return list(json.loads((Path(out_dir) / RUN_STATE_FILE).read_text())["stages"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _with_overrides(config: MergeConfig, push: str | None, private: bool) -> MergeConfig:
    """`config` with `--push` and `--private` written into its `hub:` section."""
    if not push and not private:
        return config
    settings = config.hub or HubSettings()
    update: dict[str, Any] = {"repo_id": push} if push else {}
    if private:
        update["private"] = True
    return config.model_copy(update={"hub": settings.model_copy(update=update)})


def _chain(stages: list[_Stage], *inputs: Any) -> str:
    """A stage's key: its own inputs and the key of the stage it builds on."""
    return _digest([stages[-1].key, *inputs])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load_state(out_dir: Path, fingerprint: str, *, force: bool) -> dict[str, Any]:
    """The stages an earlier run finished in `out_dir`, by name; none for a new or forced run."""
    if not out_dir.exists() or force:
        return {}
    path = out_dir / RUN_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputError(
            f"{out_dir}: already exists and was not made by `hubmerge run` "
            "(pass --force to replace it)"
        ) from None
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable ({e}); pass --force to start over") from None
    if state.get("version") != _STATE_VERSION or state.get("fingerprint") != fingerprint:
        raise OutputError(
            f"{out_dir}: was merged from a different config; pass --force to merge again "
            "(replacing it), or choose another OUT_DIR"
        )
    return state["stages"]


def _save_state(out_dir: Path, fingerprint: str, stages: dict[str, Any]) -> None:
    # Written aside and renamed, so a crash mid-write never leaves a state that cannot be read.
    state = {"version": _STATE_VERSION, "fingerprint": fingerprint, "stages": stages}
    atomic_write(out_dir / RUN_STATE_FILE, json_text(state))
