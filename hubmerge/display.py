"""What long work shows in a terminal: rich progress bars with ETA, and one-line log messages.

One `Display` serves both the writer (bytes and tensors written) and the methods' own long
loops (NER matrices scored, OLM positions x candidates), so every command looks the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Display:
    """A context manager holding one rich `Progress`; bars disappear when their work is done."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._write: Any = None
        self._tensors = (0, 0)

    def __enter__(self) -> Display:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    # The writer's protocol (`hubmerge.writer.Progress`).
    def start(self, total_bytes: int, total_tensors: int) -> None:
        self._tensors = (0, total_tensors)
        self._write = self._progress.add_task("writing", total=total_bytes, detail="")

    def advance(self, nbytes: int) -> None:
        done, total = self._tensors[0] + 1, self._tensors[1]
        self._tensors = (done, total)
        task = self._progress.tasks[-1]
        mb = (task.completed + nbytes) / 1e6
        detail = f"{mb:,.0f}/{(task.total or 0) / 1e6:,.0f} MB, {done}/{total} tensors"
        self._progress.update(self._write, advance=nbytes, detail=detail)

    # The methods' protocol (`hubmerge.merge.Reporter`).
    def progress(self, description: str, total: int) -> Callable[[], None]:
        task = self._progress.add_task(description, total=total, detail=f"0/{total}")

        def step() -> None:
            self._progress.advance(task)
            done = int(self._progress.tasks[task].completed)
            self._progress.update(task, detail=f"{done}/{total}")

        return step

    # Evaluation's protocol (`hubmerge.evals.Counter`): lm-eval learns its work batch by batch.
    def counter(self, description: str) -> Callable[[int, int], None]:
        """A bar whose total grows as work is found: `count(found, done)` adds to both."""
        task = self._progress.add_task(description, total=None, detail="")
        totals = [0, 0]

        def count(found: int, done: int) -> None:
            totals[0] += found
            totals[1] += done
            detail = f"{totals[1]:,}/{totals[0]:,} requests"
            self._progress.update(task, total=totals[0], completed=totals[1], detail=detail)

        return count

    def log(self, message: str) -> None:
        self._progress.console.print(message, highlight=False, soft_wrap=True)
