"""`merge_report.json`: OLM's record of every score, written atomically after every position.

The report is also the resume state: a re-run with the same config fingerprint continues at
the first unfinished position and re-evaluates nothing recorded. Its layout follows the public
implementation's (`metrics: {dataset: {model: score}}` and `best_model` per layer) and adds
tie-breakers, ranks, timings and the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hubmerge.config import OlmConfig
from hubmerge.datasets import dataset_file
from hubmerge.errors import ConfigError
from hubmerge.folder import OlmReport, atomic_write, json_text
from hubmerge.methods.olm.scoring import Score

VERSION = 2


def fingerprint(config: OlmConfig) -> str:
    """A hash of everything that changes what OLM computes (not where or how fast)."""
    relevant = config.model_dump(
        mode="json", exclude={"device", "devices", "workers", "batch_size", "out_dtype"}
    )
    relevant["dataset_sha256"] = {
        name: hashlib.sha256(dataset_file(name).read_bytes()).hexdigest() for name in config.dataset
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def scores_json(scores: dict[str, Score]) -> dict[str, dict[str, Any]]:
    """Scores as the report holds them; exact-mode per-sample misses as a 0/1 string."""
    out: dict[str, dict[str, Any]] = {}
    for name, s in scores.items():
        out[name] = {"score": s.value, "tiebreak": s.tiebreak}
        if s.per_sample and all(v in (0.0, 1.0) for v in s.per_sample):
            out[name]["misses"] = "".join(str(int(v)) for v in s.per_sample)
        elif s.per_sample:
            out[name]["per_sample"] = list(s.per_sample)
    return out


def scores_from_json(data: dict[str, dict[str, Any]]) -> dict[str, Score]:
    return {
        name: Score(
            s["score"],
            s["tiebreak"],
            tuple(float(c) for c in s["misses"])
            if "misses" in s
            else tuple(s.get("per_sample", ())),
        )
        for name, s in data.items()
    }


def new_report(config: OlmConfig) -> OlmReport:
    return OlmReport(
        version=VERSION,
        fingerprint=fingerprint(config),
        direction=config.direction,
        aggregate=config.aggregate,
        datasets={name: d.mode for name, d in config.dataset.items()},
        base_model=None,
        base_selection=None,
        base_scores=None,
        layers=[],
        complete=False,
    )


def load_report(path: Path, config: OlmConfig, *, restart: bool) -> OlmReport:
    """The saved report to resume from, or a fresh one; a changed config is refused."""
    if restart or not path.exists():
        return new_report(config)
    damaged = ConfigError(
        f"{path}: the saved state of an unfinished OLM run is damaged (truncated by a crash?); "
        "pass --restart to discard it"
    )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        report = OlmReport.from_json(data)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise damaged from None
    if report.version != VERSION:
        raise damaged
    if report.fingerprint != fingerprint(config):
        raise ConfigError(
            f"{path}: an unfinished OLM run with a different config (models, datasets, samples or "
            "modes changed) is saved here; pass --restart to discard it"
        )
    return report


def save_report(path: Path, report: OlmReport) -> None:
    """Write the report so that a crash leaves either the old or the new file, never half."""
    atomic_write(path, json_text(report.to_json()))
