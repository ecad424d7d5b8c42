"""OLM's candidates scored in parallel: one process per worker, each with its own working model.

Candidates at one position are independent: each needs the working model as the search holds it
(the starting model with the positions decided so far) plus the candidate at the position. A
worker gets exactly that description - the layout, the position and the candidate - and brings
its own working model to it, loading only the layers that differ from what it holds. Results
are collected by candidate, in the order the search asked for them, so decisions, tie-breaks,
the report and the output bytes do not depend on how many workers there are or which finished
first. Workers are processes started with torch's `spawn` context under a
`concurrent.futures.ProcessPoolExecutor` (one per worker, so a failure names its worker); each
runs on its own device (`devices: [cuda:0, cuda:1]`) or on the CPU (`workers: N`), with the
parent's torch thread count so CPU arithmetic is the same as in one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hubmerge.datasets import Sample
from hubmerge.errors import HubmergeError, quoted
from hubmerge.methods.olm.evaluate import Counters, Limits, WorkingModel
from hubmerge.methods.olm.scoring import Score
from hubmerge.sources import ModelSource

#: A position of the search: a layer index and, with module granularity, the part of it.
Position = tuple[int, str | None]


class CandidateTensors(Protocol):
    """Turns a candidate description into the tensors `WorkingModel.load` takes (picklable)."""

    def whole(self, candidate: Any) -> Mapping[str, Any]: ...

    def at(self, candidate: Any, position: Position) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Layout:
    """What the working model holds: the starting candidate's label, and the label of every
    position decided for another candidate."""

    base: str
    placed: tuple[tuple[Position, str], ...] = ()


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to build its working model and the candidates' tensors."""

    first: ModelSource
    samples: dict[str, tuple[str, list[Sample]]]
    limits: Limits
    batch_size: int
    dtype: str
    tensors: CandidateTensors
    #: Every candidate of the run, by label.
    candidates: Mapping[str, Any]
    threads: int


class _Worker:
    """The worker process's side: its working model and what the model holds now."""

    def __init__(self, setup: WorkerSetup, device: str) -> None:
        torch.set_num_threads(setup.threads)
        self.setup = setup
        self.model = WorkingModel(
            setup.first,
            setup.samples,
            limits=setup.limits,
            batch_size=setup.batch_size,
            device=device,
            dtype=getattr(torch, setup.dtype),
        )
        self.base: str | None = None  # None: `first` as loaded, not yet told which label it is
        self.placed: dict[Position, str] = {}

    def score(
        self, layout: Layout | None, position: Position | None, label: str, start: int
    ) -> tuple[list[Score], dict[str, Any], int]:
        tensors, candidates = self.setup.tensors, self.setup.candidates
        model = self.model
        before = dict(vars(model.counters))
        if position is None or layout is None:  # a whole model (the starting-model choice)
            model.load(tensors.whole(candidates[label]))
            self.base, self.placed = label, {}
            scores = model.evaluate()
        else:
            if self.base != layout.base:
                model.load(tensors.whole(candidates[layout.base]))
                self.base, self.placed = layout.base, {}
            wanted = dict(layout.placed)
            for where in sorted({*self.placed, *wanted} - {position}, key=_order):
                target = wanted.get(where, layout.base)
                if self.placed.get(where, layout.base) != target:
                    model.load(tensors.at(candidates[target], where))
                    self.placed[where] = target
            model.cache_prefix(start)
            model.load(tensors.at(candidates[label], position))
            self.placed[position] = label
            scores = model.evaluate(start=start)
        after = vars(model.counters)
        return scores, {k: after[k] - before[k] for k in after}, os.getpid()


def _order(position: Position) -> tuple[int, str]:
    return position[0], position[1] or ""


_WORKER: _Worker | None = None


def _start(setup: WorkerSetup, device: str) -> None:
    global _WORKER
    _WORKER = _Worker(setup, device)


def _score(
    layout: Layout | None, position: Position | None, label: str, start: int
) -> tuple[list[Score], dict[str, Any], int]:
    assert _WORKER is not None, "worker used before its initializer ran"
    return _WORKER.score(layout, position, label, start)


class Workers:
    """A pool of OLM workers, one per device; `evaluate` scores candidates across them."""

    def __init__(self, devices: Sequence[str], setup: WorkerSetup) -> None:
        context = torch.multiprocessing.get_context("spawn")
        self.devices = list(devices)
        self.counters = Counters()
        #: Each worker's process id once it has answered (for diagnostics and tests).
        self.pids: dict[int, int] = {}
        self._pools = [
            ProcessPoolExecutor(1, mp_context=context, initializer=_start, initargs=(setup, d))
            for d in self.devices
        ]
        # Start every worker now, loading their models side by side, so that a worker that
        # cannot start (a wrong device, too little memory) fails here, naming itself.
        started = [pool.submit(os.getpid) for pool in self._pools]
        try:
            for worker, future in enumerate(started):
                self.pids[worker] = self._result(future, worker, "start")
        except BaseException:
            self.close()
            raise

    def evaluate(
        self,
        layout: Layout | None,
        position: Position | None,
        challengers: Sequence[Any],
        start: int,
        advance: Callable[[], None] | None = None,
    ) -> dict[str, list[Score]]:
        """Score each challenger from layer `start`: at `position` in `layout`, or with
        `position` None as a whole model (no layout).

        Challengers go to whichever worker is free; the result is keyed by label in the
        order of `challengers`. A worker that dies or fails is a `HubmergeError` naming it.
        """
        waiting = list(challengers)
        running: dict[Future, tuple[int, Any]] = {}
        done: dict[str, list[Score]] = {}
        idle = list(range(len(self._pools)))
        try:
            while waiting or running:
                while waiting and idle:
                    worker, candidate = idle.pop(0), waiting.pop(0)
                    future = self._pools[worker].submit(
                        _score, layout, position, candidate.label, start
                    )
                    running[future] = (worker, candidate)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: running[f][0]):
                    worker, candidate = running.pop(future)
                    scores, spent, pid = self._result(future, worker, position)
                    self.pids[worker] = pid
                    for name, value in spent.items():
                        setattr(self.counters, name, getattr(self.counters, name) + value)
                    done[candidate.label] = scores
                    idle.append(worker)
                    if advance:
                        advance()
        except BaseException:
            self.close()
            raise
        return {c.label: done[c.label] for c in challengers}

    def _result(self, future: Future, worker: int, position: Position | None | str) -> Any:
        # Candidates are not named: a label can be a local path, which messages never show.
        doing = (
            "loading its working model"
            if position == "start"
            else "scoring the starting models"
            if position is None
            else f"scoring layer {position[0]}'s candidates"
        )
        name = f"OLM worker {worker} ({quoted(self.devices[worker])})"
        try:
            return future.result()
        except BrokenProcessPool:
            raise HubmergeError(
                f"{name} stopped unexpectedly (killed, or out of memory) while {doing}; every "
                "finished position is kept: run the same command again to resume"
            ) from None
        except HubmergeError:
            raise
        except Exception as exc:
            raise HubmergeError(
                f"{name} failed while {doing}: {type(exc).__name__}: {quoted(str(exc), 160)}"
            ) from None

    def close(self) -> None:
        """Stop every worker (waiting for none: a failed run ends now)."""
        for pool in self._pools:
            # shutdown() stops no busy worker; the executor keeps its processes here.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                if process.is_alive():
                    process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
