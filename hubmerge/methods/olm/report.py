"""`merge_report.json`: OLM's record of every score, written atomically after every position.

The report is also the resume state: a re-run with the same config fingerprint continues at
the first unfinished position and re-evaluates nothing recorded. Its layout follows the public
implementation's (`metrics: {dataset: {model: score}}` and `best_model` per layer) and adds
tie-breakers, ranks, timings and the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hubmerge.config import OlmConfig
from hubmerge.errors import ConfigError
from hubmerge.methods.olm.scoring import Score

REPORT_FILE = "merge_report.json"
VERSION = 1


def fingerprint(config: OlmConfig) -> str:
    """A hash of everything that changes what OLM computes (not where or how fast)."""
    relevant = config.model_dump(mode="json", exclude={"device", "batch_size", "out_dtype"})
    relevant["dataset_sha256"] = {
        name: hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in config.dataset
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def scores_json(scores: dict[str, Score]) -> dict[str, dict[str, float]]:
    return {name: {"score": s.value, "tiebreak": s.tiebreak} for name, s in scores.items()}


def scores_from_json(data: dict[str, dict[str, float]]) -> dict[str, Score]:
    return {name: Score(s["score"], s["tiebreak"]) for name, s in data.items()}


def new_report(config: OlmConfig) -> dict[str, Any]:
    return {
        "version": VERSION,
        "fingerprint": fingerprint(config),
        "direction": config.direction,
        "aggregate": config.aggregate,
        "datasets": {name: d.mode for name, d in config.dataset.items()},
        "base_model": None,
        "base_selection": None,
        "base_scores": None,
        "layers": [],
        "complete": False,
    }


def load_report(path: Path, config: OlmConfig, *, restart: bool) -> dict[str, Any]:
    """The saved report to resume from, or a fresh one; a changed config is refused."""
    if restart or not path.exists():
        return new_report(config)
    report = json.loads(path.read_text())
    if report.get("fingerprint") != fingerprint(config):
        raise ConfigError(
            f"{path}: an unfinished OLM run with a different config (models, datasets, samples or "
            "modes changed) is saved here; pass --restart to discard it"
        )
    return report


def save_report(path: Path, report: dict[str, Any]) -> None:
    """Write the report so that a crash leaves either the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)
