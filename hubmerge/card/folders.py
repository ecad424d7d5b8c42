"""Model folders kept in git: the convention that `hubmerge card --all` and the CI action follow.

A model folder is a `hubmerge merge` output without its weights and tokenizer vocabulary: the
files a card is rendered from (`hubmerge_plan.json`, `hubmerge_sources.json`,
`hubmerge_config.yml`, `mergekit_config.yml`, `config.json`, `tokenizer_config.json`, reports)
and the ones it renders (`README.md`, `layer_map.svg`), plus two inputs the user edits:

- `config.yaml`, the merge config. Its `hub:` and `card:` sections are copied into
  `hubmerge_config.yml`, which the card reads; a change anywhere else means the committed outputs
  belong to another merge, which only merging again can fix, so it is an error.
- `results/*.json`, lm-eval results files, shown on the card in file-name order.

`refresh` brings one folder's generated files up to date or, with `check`, writes nothing and
says which differ, with a diff: CI fails a pull request whose committed card is stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from hubmerge.card.render import card_files, draw_images, stale_diff
from hubmerge.config import load_config
from hubmerge.errors import CardError, HubmergeError
from hubmerge.folder import (
    CONFIG_FILE,
    PLAN_FILE,
    config_yaml,
    merge_fingerprint,
    results_files,
)

MODEL_CONFIG = "config.yaml"
#: The config sections that only feed the card and the upload, never the weights.
CARD_SECTIONS = ("hub", "card")


class Status(str, Enum):
    FRESH = "fresh"  # every generated file is what the folder's inputs give
    UPDATED = "updated"  # some were rewritten
    STALE = "stale"  # some differ (a check writes nothing)
    ERROR = "error"  # the folder cannot be rendered


@dataclass(frozen=True)
class FolderReport:
    """What `refresh` found in (or did to) one model folder."""

    folder: Path
    status: Status
    #: The generated files that were rewritten (updated) or differ (stale).
    files: tuple[str, ...] = ()
    #: Unified diffs of those files, on disk -> fresh render.
    diff: str = ""
    #: Why the folder cannot be rendered.
    error: str = ""


def model_folders(root: Path) -> list[Path]:
    """`root` itself when it is a model folder (it has a plan), else the ones directly in it."""
    root = Path(root)
    if (root / PLAN_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise CardError(f"{root}: no such folder")
    folders = sorted(p for p in root.iterdir() if (p / PLAN_FILE).is_file())
    if not folders:
        raise CardError(f"{root}: no model folders in it (a model folder holds {PLAN_FILE})")
    return folders


def refresh(folder: Path, *, check: bool = False, template: Path | None = None) -> FolderReport:
    """Render `folder`'s generated files from its inputs and rewrite those that changed.

    With `check`, nothing is written: the changed files are reported as stale, with their diff.
    A folder that cannot be rendered is reported as an error rather than raised, so one broken
    folder does not hide the state of the others.
    """
    folder = Path(folder)
    diffs: dict[str, str] = {}
    try:
        config = synced_config(folder)
        diff = stale_diff(folder / CONFIG_FILE, config) if config is not None else None
        if config is not None and diff is not None:
            if check:
                # The card would be rendered from the stale copy: report the config alone
                # (updating rewrites the config first, then the card from it).
                return FolderReport(folder, Status.STALE, (CONFIG_FILE,), diff)
            (folder / CONFIG_FILE).write_text(config, encoding="utf-8")
            diffs[CONFIG_FILE] = diff
        if not check:
            draw_images(folder)
        rendered = card_files(folder, results=results_files(folder), template=template)
        for name, text in rendered.items():
            diff = stale_diff(folder / name, text)
            if diff is not None:
                diffs[name] = diff
                if not check:
                    (folder / name).write_text(text, encoding="utf-8")
    except HubmergeError as e:
        return FolderReport(folder, Status.ERROR, error=str(e))
    if not diffs:
        return FolderReport(folder, Status.FRESH)
    status = Status.STALE if check else Status.UPDATED
    return FolderReport(folder, status, tuple(diffs), "\n".join(diffs.values()))


def synced_config(folder: Path) -> str | None:
    """The `hubmerge_config.yml` text that `config.yaml` gives; None without a `config.yaml`.

    A `config.yaml` that differs from the committed config outside `hub:` and `card:` is a
    `CardError`: the plan, recipe and sources in the folder were made by another merge.
    """
    path = Path(folder) / MODEL_CONFIG
    if not path.is_file():
        return None
    wanted = load_config(path)
    merged = load_config(Path(folder) / CONFIG_FILE)
    if merge_fingerprint(wanted) != merge_fingerprint(merged):
        a, b = wanted.model_dump(mode="json"), merged.model_dump(mode="json")
        keys = [
            k
            for k in sorted(a.keys() | b.keys())
            if k not in CARD_SECTIONS and a.get(k) != b.get(k)
        ]
        raise CardError(
            f"{path}: {', '.join(keys)} changed since the merge ({CONFIG_FILE} has the merged "
            f"values): merge again (`hubmerge merge {path} OUT`) and copy the outputs here"
        )
    return config_yaml(wanted)


def log_lines(report: FolderReport, *, annotate: bool = False) -> list[str]:
    """How a CI log shows `report`: one line, then the diff of stale files.

    `annotate` adds a GitHub Actions annotation (`::error` or `::warning`), which GitHub shows
    on the pull request, at the file.
    """
    folder = report.folder.as_posix()
    detail = report.error or ", ".join(report.files)
    lines = [f"{report.status.value:<7} {folder}" + (f": {detail}" if detail else "")]
    if report.status is Status.STALE:
        lines.append(report.diff)
    if annotate and report.status is not Status.FRESH:
        fix = f"run `hubmerge card --all {folder}` and commit the result"
        level, title, message = {
            Status.STALE: ("error", "Stale model card", f"stale: {detail}; {fix}"),
            Status.UPDATED: ("warning", "Model card re-rendered", f"was stale: {detail}; {fix}"),
            Status.ERROR: ("error", "Model card error", report.error),
        }[report.status]
        target = f"{folder}/{report.files[0]}" if report.files else folder
        lines.append(f"::{level} file={_property(target)},title={title}::{_data(message)}")
    return lines


def _data(text: str) -> str:
    """An annotation message, escaped as GitHub's workflow commands require."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    """An annotation property value (a file name), escaped as workflow commands require."""
    return _data(text).replace(":", "%3A").replace(",", "%2C")
