"""What the page's buttons do, answered as Markdown for the page: validate, merge, publish.

Each handler takes the page's values and returns (or, for a merge, streams) what the page
shows; `space/app.py` wires them to its buttons. Errors become one line on the page
(`error_status`), never a traceback: hubmerge's own message, or the kind of an unexpected
failure, with a token the visitor pasted scrubbed out.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hubmerge.errors import HubmergeError, TokenError
from hubmerge.hub import publish, scrub
from hubmerge.space.jobs import MergeJob, check, discard
from hubmerge.space.policy import read_config_text
from hubmerge.space.results import card_markdown, download_files

#: How often the page's log and progress bar follow a running merge.
POLL_SECONDS = 0.25


def escape(text: str) -> str:
    """Plain text for a Markdown view: hubmerge's messages quote names like `down_proj`."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def error_status(error: BaseException, secret: str = "") -> str:
    """One line for the page: hubmerge's own message, or the kind of an unexpected failure."""
    if isinstance(error, HubmergeError):
        message = str(error)
    else:  # a bug: the details go to the server's log, the page gets the gist
        traceback.print_exception(error)
        message = f"unexpected {type(error).__name__}: {error}"
    message = scrub(message, secret)
    return f"<div class='status-error'>\n\n**Error:** {escape(message)}\n\n</div>"


def ok_status(message: str) -> str:
    return f"<div class='status-ok'>\n\n{message}\n\n</div>"


def validate(text: str) -> tuple[str, list[list[str]]]:
    """Check the config and the models' configs; the layer map where it is known already."""
    try:
        result = check(text)  # in a subprocess with its own time and memory budget
    except Exception as e:
        return error_status(e), []
    models = ", ".join(f"`{ref}` ({n} layers)" for ref, n in result.layers.items())
    if result.parameters is not None:
        tables = "\n\n".join(markdown_table(table) for table in result.parameters)
        return ok_status(
            f"Valid {result.method} config: {result.depth} layers from {models}, computed by "
            "mergekit: each tensor blends the models' tensors, with these parameters.\n\n" + tables
        ), []
    if result.rows is None:
        return ok_status(
            f"Valid {result.method} config: {models}. This method chooses each layer while "
            "merging, so its layer map comes with the model card."
        ), []
    return ok_status(
        f"Valid: {result.depth} layers from {models}. Planned from the models' "
        "`config.json` files alone; scales are resolved per tensor when merging."
    ), [list(row) for row in result.rows]


def markdown_table(table: Mapping[str, Any]) -> str:
    """A parameter table (`mergekit_run.parameter_tables`) as Markdown, every cell escaped."""
    lines = [
        f"**{escape(table['title'])}**",
        "",
        "| " + " | ".join(escape(c) for c in table["columns"]) + " |",
        "|" + "---|" * len(table["columns"]),
    ]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def merge_stream(
    text: str, name: str, previous: str | None, progress: Callable[..., object]
) -> Iterator[tuple[Any, ...]]:
    """Merge in a subprocess, streaming its log; then the card, the files and the model.

    Yields (status, log, card, files, model folder), and moves `progress(fraction, desc=...)`.
    A visitor keeps one model: the previous one's folder is removed when the next merge
    starts. The config is checked first, without waiting for the merges before it (they take
    turns: `JOB_SLOTS`). Closing the stream (the visitor left) stops the merge and removes its
    folder.
    """
    discard(previous)
    try:
        check(text)
        job = MergeJob(read_config_text(text), name)
    except Exception as e:
        yield error_status(e), "", "", None, None
        return
    try:
        yield ok_status("Merging…"), "", "", None, None
        shown = 0
        while not job.wait(POLL_SECONDS):
            if job.reporter.bar:
                description, done, total = job.reporter.bar
                progress(int(done) / max(int(total), 1), desc=str(description))
            if len(job.reporter.lines) != shown:
                shown = len(job.reporter.lines)
                yield ok_status("Merging…"), job.reporter.text, "", None, None
    except GeneratorExit:  # the visitor left: the folder goes once the merge stops
        job.abandon()
        raise
    if job.error is not None:
        job.close()
        yield error_status(job.error), job.reporter.text, "", None, None
        return
    yield (
        ok_status(f"Merged **{escape(job.out_dir.name)}**: its card is below; publish it next."),
        job.reporter.text,
        card_markdown(job.out_dir),
        [str(path) for path in download_files(job.out_dir)],
        str(job.out_dir),
    )


def publish_model(
    model_dir: str | None, repo_id: str, private: bool, token: str, username: str | None
) -> str:
    """Upload the merged model with the visitor's `token` (signed in, or pasted; never echoed)
    to `repo_id`, under `username` (when signed in) if it names no owner.

    The Space's own token is never used: without one of the visitor's, nothing is published.
    """
    if not model_dir:
        return error_status(HubmergeError("nothing to publish yet: merge a model first"))
    if not token:
        return error_status(
            HubmergeError("sign in with Hugging Face, or paste a token with write access")
        )
    repo_id = repo_id.strip()
    if "/" not in repo_id and username is not None:
        repo_id = f"{username}/{repo_id}"
    try:
        result = publish(Path(model_dir), repo_id, private=private, token=token)
    except TokenError:  # the CLI's advice (`hf auth login`, --token) means nothing on a page
        return error_status(
            HubmergeError(
                f"{repo_id}: the Hub refused the token (401: invalid or expired): sign in with "
                "Hugging Face again, or paste a token with write access"
            )
        )
    except Exception as e:
        return error_status(e, secret=token)
    visibility = "private" if private else "public"
    return ok_status(f"Published ({visibility}): [{result.url}]({result.url})")
