"""OLM with several worker processes: the same run as one process, and a dead worker named."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from hubmerge.config import parse_config
from hubmerge.merge import merge
from tests.helpers import run_cli, tensors, write_yaml
from tests.test_olm import olm_config, report_without_timings


def test_two_workers_match_one_process_and_a_dead_worker_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Candidates spread over 2 CPU workers. A worker killed mid-run: one line naming it (exit
    code 2), the finished positions kept on disk; the same command then finishes the run with
    the decisions, scores, report and bytes of one process (starting-model choice included),
    and the report counts every worker's evaluations."""
    from hubmerge.methods.olm import workers as workers_module

    merge(parse_config(olm_config(tmp_path), "one"), tmp_path / "one")
    path = write_yaml(tmp_path / "olm.yaml", olm_config(tmp_path, workers=2))
    real = workers_module.Workers.evaluate
    calls = {"n": 0}

    def kill_on_third_call(self: workers_module.Workers, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # starting models, one position, then worker 1 dies
            os.kill(self.pids[1], signal.SIGKILL)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(workers_module.Workers, "evaluate", kill_on_third_call)
    result = run_cli("merge", path, tmp_path / "out")
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: OLM worker 1 ") and "resume" in error
    assert str(tmp_path) not in error and "/" not in error  # no local path in the message
    saved = json.loads((tmp_path / ".out.work" / "merge_report.json").read_text())
    assert len(saved["layers"]) == 1 and not saved["complete"]
    assert not (tmp_path / "out").exists()

    monkeypatch.undo()
    assert run_cli("merge", path, tmp_path / "out").exit_code == 0
    assert report_without_timings(tmp_path / "out") == report_without_timings(tmp_path / "one")
    one, out = tensors(tmp_path / "one"), tensors(tmp_path / "out")
    assert one.keys() == out.keys() and all(torch.equal(one[k], out[k]) for k in one)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    counted, rivals = report["evaluation"], len(olm_config(tmp_path)["models"]) - 1
    # The resumed run evaluated the positions left only, and counted every worker's work.
    assert (
        counted["full_evaluations"] + counted["prefix_evaluations"]
        == (len(report["layers"]) - 1) * rivals
    )
