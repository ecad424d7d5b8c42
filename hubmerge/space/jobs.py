"""The Space's two jobs, each in a forked process with its own time and memory budget.

`check` validates the editor's config and previews its plan; `MergeJob` merges into a temporary
folder, reporting to a `JobReporter` that a page polls to stream the log and move a progress
bar. Both run in `Budgeted`: one visitor's request that goes wrong is stopped alone, and the
others' jobs keep running. Merges take turns (`JOB_SLOTS`); the checks before a merge do not
wait.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hubmerge.config import MergeConfig, MergekitConfig
from hubmerge.errors import BudgetError, HubmergeError
from hubmerge.methods import mergekit_run
from hubmerge.sources import is_hub_id
from hubmerge.space.disk import check_disk
from hubmerge.space.policy import (
    CHECK_MEMORY,
    CHECK_SECONDS,
    JOB_MEMORY,
    JOB_SECONDS,
    JOB_SLOTS,
    check_name,
    read_config_text,
)
from hubmerge.space.preview import preview

#: Every job's temporary folder starts so; `discard` removes nothing else.
_JOB_PREFIX = "hubmerge-space-"


class JobReporter:
    """What a merge reports (the writer's `Progress` and the methods' `Reporter`), kept for a
    page that polls it from another thread: the log so far and the bar now running.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        #: [description, done, total] of the bar now running; a list so its step can move it.
        self.bar: list[str | int] | None = None

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.log(f"writing {total_tensors} tensors, {total_bytes / 1e6:,.1f} MB")
        self.bar = ["writing weights", 0, total_bytes]

    def advance(self, nbytes: int) -> None:
        assert self.bar is not None
        self.bar[1] += nbytes  # type: ignore[operator]

    def progress(self, description: str, total: int) -> Callable[[], None]:
        bar: list[str | int] = [description, 0, total]
        self.bar = bar

        def step() -> None:
            bar[1] += 1  # type: ignore[operator]

        return step

    def step(self) -> None:
        """Advance the bar now running (what a step of a `Budgeted` job's bar arrives as)."""
        if self.bar is not None:
            self.bar[1] += 1  # type: ignore[operator]

    def log(self, message: str) -> None:
        self.lines.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Checked:
    """What validating a config found: the method, each model's depth and the layer map."""

    method: str
    layers: dict[str, int]
    #: The plan's layer map and depth; None for methods that decide the layer map while
    #: merging (NER, OLM).
    rows: list[tuple[str, str, str, str]] | None
    depth: int | None
    #: For methods mergekit computes: their parameter tables (`mergekit_run.parameter_tables`).
    parameters: list[dict[str, Any]] | None = None


def check(text: str) -> Checked:
    """Validate the editor's config and preview its plan, in a `Budgeted` subprocess."""
    job = Budgeted(_check, (text,), {}, CHECK_SECONDS, CHECK_MEMORY)
    job.wait(None)
    if job.error is not None:
        raise job.error
    result: Checked = job.result
    return result


def _check(text: str) -> Checked:
    config = read_config_text(text)
    previewed = preview(config)
    layers = {ref: s.num_layers for ref, s in previewed.sources.items()}
    plan = previewed.plan
    if isinstance(config, MergekitConfig) and plan is not None:
        tables = mergekit_run.parameter_tables(config.mergekit_data())
        return Checked(config.merge_method, layers, None, len(plan.layers), tables)
    if plan is None:
        return Checked(config.merge_method, layers, None, None)
    return Checked(config.merge_method, layers, plan.rows(), len(plan.layers))


class Budgeted:
    """`target(*args, **kwargs)` in a forked process that may use `seconds` of wall time and
    `memory` bytes beyond what the server already holds (its address space is capped), then is
    killed: a request that goes wrong costs its visitor alone.

    The child reports through a pipe: `reporter` (a `JobReporter`) hears what it logs, when
    given, and `result` or `error` holds the outcome once `wait` says it ended.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seconds: float,
        memory: int,
        reporter: JobReporter | None = None,
        slots: threading.BoundedSemaphore | None = None,
    ) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._call = (target, args, kwargs)
        self._seconds = seconds
        self._memory = memory
        self._reporter = reporter
        self._slots = slots
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        slots, reporter = self._slots, self._reporter
        if slots is not None and not slots.acquire(blocking=False):
            if reporter:
                reporter.log("waiting for the merge before this one to finish")
            while not slots.acquire(timeout=0.5):
                if self._stopped.is_set():
                    return
        try:
            self._follow()
        finally:
            if slots is not None:
                slots.release()

    def _follow(self) -> None:
        if self._stopped.is_set():
            return
        seconds, memory, reporter = self._seconds, self._memory, self._reporter
        context = multiprocessing.get_context("fork")  # the child has what this process has
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_child, args=(send, *self._call, memory, reporter is not None)
        )
        self._process = process
        process.start()
        send.close()
        deadline = time.monotonic() + seconds
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.error = BudgetError(
                        f"stopped after {seconds:,.0f} s, the time this Space gives each job"
                    )
                    break
                if not receive.poll(min(left, 0.5)):
                    if self._stopped.is_set():
                        break
                    continue
                try:
                    kind, payload = receive.recv()
                except (EOFError, OSError):
                    self.error = BudgetError(
                        "the job was stopped (killed, or over the memory this Space gives each "
                        f"job: {memory / 2**30:,.1f} GiB)"
                    )
                    break
                if kind == "result":
                    self.result = payload
                    break
                if kind == "error":
                    self.error = payload
                    break
                if reporter is not None:
                    getattr(reporter, kind)(*payload)
        finally:
            receive.close()
            if process.is_alive():
                process.kill()
            process.join()

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: until it ends); whether the job has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Kill the job (or cancel it while it waits its turn)."""
        self._stopped.set()
        if self._process is not None and self._process.is_alive():
            self._process.kill()


def _child(
    send: Connection,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    memory: int,
    relay: bool,
) -> None:
    """The forked side of `Budgeted`: cap the address space, run, send the outcome."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * page
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + memory if hard == resource.RLIM_INFINITY else min(hard, mapped + memory)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        if relay:
            kwargs = kwargs | {"reporter": _Relay(send)}
        send.send(("result", target(*args, **kwargs)))
    except MemoryError:
        message = f"over the memory this Space gives each job ({memory / 2**30:,.1f} GiB)"
        send.send(("error", BudgetError(message)))
    except HubmergeError as e:
        send.send(("error", e))
    except BaseException as e:  # a bug: the details go to the server's log, the page the gist
        traceback.print_exception(e)
        send.send(("error", RuntimeError(f"unexpected {type(e).__name__}")))
    finally:
        send.close()


class _Relay:
    """A `JobReporter` in the child: each call goes through the pipe to the parent's."""

    def __init__(self, send: Connection) -> None:
        self._send = send

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self._send.send(("start", (total_bytes, total_tensors)))

    def advance(self, nbytes: int) -> None:
        self._send.send(("advance", (nbytes,)))

    def progress(self, description: str, total: int) -> Callable[[], None]:
        self._send.send(("progress", (description, total)))
        return lambda: self._send.send(("step", ()))

    def log(self, message: str) -> None:
        self._send.send(("log", (message,)))


class MergeJob:
    """One merge in a `Budgeted` subprocess, into `folder/NAME`; `close()` removes the folder.

    Before any weights are downloaded, the job previews the config and checks the disk, so
    what can fail early does; `error` holds what stopped it, `out_dir` the model once done.
    Merges take turns (`JOB_SLOTS`): a job waits for its turn before it starts.
    """

    def __init__(self, config: MergeConfig, name: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=_JOB_PREFIX))
        self.out_dir = self.folder / check_name(name)
        self.reporter = JobReporter()
        self._job = Budgeted(
            _merge,
            (config, self.out_dir),
            {},
            JOB_SECONDS,
            JOB_MEMORY,
            reporter=self.reporter,
            slots=JOB_SLOTS,
        )

    @property
    def error(self) -> BaseException | None:
        return self._job.error

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; whether the job has finished."""
        return self._job.wait(timeout)

    def close(self) -> None:
        discard(self.out_dir)

    def abandon(self) -> None:
        """Nobody waits for the result any more: stop the merge, then remove its folder."""
        self._job.stop()

        def clean_up() -> None:
            self._job.wait(None)
            self.close()

        threading.Thread(target=clean_up, daemon=True).start()


def _merge(config: MergeConfig, out_dir: Path, reporter: JobReporter) -> None:
    """A merge job's work (in the `Budgeted` child): check early, then merge."""
    from hubmerge.merge import merge

    reporter.log("reading the models' configs")
    check_disk(config, preview(config), out_dir.parent)
    if any(is_hub_id(ref) for ref in config.referenced_models()):
        reporter.log("downloading weights (from the Hub, or its cache)")
    merge(config, out_dir, progress=reporter, reporter=reporter)
    reporter.log(f"done: {out_dir.name}")


def discard(model_dir: str | Path | None) -> None:
    """Remove a job's temporary folder, given the model folder it holds (or nothing)."""
    folder = Path(model_dir).parent if model_dir else None
    # Only a folder a job made: whatever the value, nothing else is ever removed.
    if folder is not None and folder.name.startswith(_JOB_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
