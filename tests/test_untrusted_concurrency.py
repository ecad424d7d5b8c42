"""Two merges into the same OUT_DIR at once: one writes, the other is told so in one line.

Staging folders belong to their process: a second run never removes a live run's staging
folder (which would break it), it is refused while the first one holds the output's lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hubmerge.writer import staged_output
from tests.helpers import run_cli, write_yaml

CLI = [sys.executable, "-c", "from hubmerge.cli import main; main()"]


def expansion(models: dict[str, Path], tmp_path: Path, append: int = 1) -> Path:
    return write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "append": append},
    )


def test_a_second_run_is_refused_while_the_first_writes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    config = expansion(models, tmp_path)
    with staged_output(tmp_path / "out", force=False) as staging:
        (staging / "half-written").write_text("mine")
        for args in ((), ("--force",)):
            result = run_cli("merge", config, tmp_path / "out", *args)
            assert result.exit_code == 2, result.output
            assert result.output.strip() == (
                f"error: {tmp_path / 'out'}: another hubmerge run (process {os.getpid()}) is "
                "writing it right now; wait for it to finish"
            )
        assert (staging / "half-written").read_text() == "mine"  # untouched
    assert (tmp_path / "out" / "half-written").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_two_processes_at_once(models: dict[str, Path], tmp_path: Path) -> None:
    config = expansion(models, tmp_path, append=3)
    runs = [
        subprocess.Popen(
            [*CLI, "merge", str(config), str(tmp_path / "out")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"COLUMNS": "400"},
        )
        for _ in range(2)
    ]
    results = [(run.wait(timeout=300), run.communicate()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, (_, err) in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
    assert "is writing it right now" in loser or "already exists" in loser
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]
