"""lm-eval results files -> the card's evaluation tables and its `model-index`.

Open LLM Leaderboard v2 tasks are normalised exactly as the leaderboard's notebook did: per
subtask `max(raw - lb, 0) / (1 - lb) * 100` with lb the random-guess baseline, the unweighted mean
over a family's subtasks, rounded to 2 decimals; `Avg.` is the mean of the six rounded scores. A
family is shown that way only when every one of its subtasks is present with the leaderboard's
few-shot count: a partial or differently-run family would not be the leaderboard's number, so
its subtasks are listed as plain tasks instead, like every other task (raw metric and stderr).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult

from hubmerge.errors import CardError

SOURCE_NAME = "Self-evaluated with lm-evaluation-harness"
SOURCE_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
TASK_TYPE, TASK_NAME = "text-generation", "Text Generation"

_BBH_CHOICES = {
    "sports_understanding": 2,
    "tracking_shuffled_objects_three_objects": 3,
    "navigate": 2,
    "snarks": 2,
    "date_understanding": 6,
    "reasoning_about_colored_objects": 18,
    "object_counting": 19,
    "logical_deduction_seven_objects": 7,
    "geometric_shapes": 11,
    "web_of_lies": 2,
    "movie_recommendation": 6,
    "logical_deduction_five_objects": 5,
    "salient_translation_error_detection": 6,
    "disambiguation_qa": 3,
    "temporal_sequences": 4,
    "hyperbaton": 2,
    "logical_deduction_three_objects": 3,
    "causal_judgement": 2,
    "formal_fallacies": 2,
    "tracking_shuffled_objects_seven_objects": 7,
    "ruin_names": 6,
    "penguins_in_a_table": 5,
    "boolean_expressions": 2,
    "tracking_shuffled_objects_five_objects": 5,
}
_MUSR_CHOICES = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}
_MATH_SUBJECTS = (
    "algebra",
    "counting_and_prob",
    "geometry",
    "intermediate_algebra",
    "num_theory",
    "prealgebra",
    "precalculus",
)


@dataclass(frozen=True)
class Family:
    """One leaderboard column: its subtasks with their baselines, and how the Hub lists it."""

    label: str
    shots: int
    #: lm-eval task -> random-guess baseline (lb).
    subtasks: Mapping[str, float]
    #: Result keys averaged within a subtask (IFEval averages two).
    metrics: tuple[str, ...]
    dataset_type: str
    metric_type: str
    metric_name: str


FAMILIES = (
    Family(
        "IFEval (0-Shot)",
        0,
        {"leaderboard_ifeval": 0.0},
        ("inst_level_strict_acc,none", "prompt_level_strict_acc,none"),
        "HuggingFaceH4/ifeval",
        "inst_level_strict_acc and prompt_level_strict_acc",
        "strict accuracy",
    ),
    Family(
        "BBH (3-Shot)",
        3,
        {f"leaderboard_bbh_{name}": 1 / n for name, n in sorted(_BBH_CHOICES.items())},
        ("acc_norm,none",),
        "BBH",
        "acc_norm",
        "normalized accuracy",
    ),
    Family(
        "MATH Lvl 5 (4-Shot)",
        4,
        {f"leaderboard_math_{subject}_hard": 0.0 for subject in _MATH_SUBJECTS},
        ("exact_match,none",),
        "hendrycks/competition_math",
        "exact_match",
        "exact match",
    ),
    Family(
        "GPQA (0-shot)",
        0,
        {f"leaderboard_gpqa_{name}": 0.25 for name in ("diamond", "extended", "main")},
        ("acc_norm,none",),
        "Idavidrein/gpqa",
        "acc_norm",
        "acc_norm",
    ),
    Family(
        "MuSR (0-shot)",
        0,
        {f"leaderboard_musr_{name}": 1 / n for name, n in _MUSR_CHOICES.items()},
        ("acc_norm,none",),
        "TAUR-Lab/MuSR",
        "acc_norm",
        "acc_norm",
    ),
    Family(
        "MMLU-PRO (5-shot)",
        5,
        {"leaderboard_mmlu_pro": 0.1},
        ("acc,none",),
        "TIGER-Lab/MMLU-Pro",
        "acc",
        "accuracy",
    ),
)
#: lm-eval's group rows for the leaderboard: size-weighted means, not the leaderboard's numbers.
LEADERBOARD_GROUPS = frozenset(
    (
        "leaderboard",
        "leaderboard_bbh",
        "leaderboard_gpqa",
        "leaderboard_math_hard",
        "leaderboard_musr",
    )
)


def normalise(raw: float, baseline: float) -> float:
    """The leaderboard's normalisation: 0 at random guessing (or below), 100 at perfect."""
    return max(raw - baseline, 0.0) / (1.0 - baseline) * 100.0


@dataclass(frozen=True)
class TaskRow:
    """One metric of one task, as lm-eval reported it."""

    task: str
    version: str
    filter: str
    shots: int | None
    metric: str
    value: float
    stderr: float | None


@dataclass(frozen=True)
class RunInfo:
    """Where a results file came from, for the card's provenance line."""

    file: str
    lm_eval_version: str | None
    date: str | None
    limit: float | None


@dataclass(frozen=True)
class Evaluation:
    """Everything the card shows about evaluation."""

    #: (label, normalised score) per complete leaderboard family, in the leaderboard's order.
    leaderboard: list[tuple[str, float]]
    #: The mean of the six, when all six are present.
    average: float | None
    tasks: list[TaskRow]
    runs: list[RunInfo]

    def eval_results(self) -> list[EvalResult]:
        """The `model-index` entries: leaderboard families first, then every other metric."""
        by_label = {family.label: family for family in FAMILIES}
        results = [
            EvalResult(
                task_type=TASK_TYPE,
                task_name=TASK_NAME,
                dataset_type=by_label[label].dataset_type,
                dataset_name=label,
                dataset_args={"num_few_shot": by_label[label].shots},
                metric_type=by_label[label].metric_type,
                metric_name=by_label[label].metric_name,
                metric_value=score,
                source_name=SOURCE_NAME,
                source_url=SOURCE_URL,
            )
            for label, score in self.leaderboard
        ]
        for row in self.tasks:
            results.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=row.task,
                    dataset_name=row.task,
                    dataset_args=None if row.shots is None else {"num_few_shot": row.shots},
                    metric_type=row.metric,
                    metric_name=row.metric
                    if row.filter == "none"
                    else f"{row.metric} ({row.filter})",
                    metric_value=round(row.value, 4),
                    source_name=SOURCE_NAME,
                    source_url=SOURCE_URL,
                )
            )
        return results


def load_results(files: Sequence[Path]) -> Evaluation:
    """Read lm-eval results files; a task may appear in only one of them."""
    merged: dict[str, dict[str, Any]] = {}
    versions: dict[str, str] = {}
    shots: dict[str, int] = {}
    owner: dict[str, Path] = {}
    runs = []
    for file in files:
        data = _read(Path(file))
        for task, metrics in data["results"].items():
            if task in owner:
                raise CardError(f"{file}: task {task} is also in {owner[task]}; give it once")
            owner[task] = Path(file)
            merged[task] = metrics
            versions[task] = str(data.get("versions", {}).get(task, "-"))
            if isinstance(data.get("n-shot", {}).get(task), int):
                shots[task] = data["n-shot"][task]
        runs.append(_run_info(Path(file), data))

    leaderboard: list[tuple[str, float]] = []
    consumed = set(LEADERBOARD_GROUPS)
    for family in FAMILIES:
        score = _family_score(family, merged, shots)
        if score is not None:
            leaderboard.append((family.label, score))
            consumed |= set(family.subtasks)
    average = (
        round(sum(score for _, score in leaderboard) / len(FAMILIES), 2)
        if len(leaderboard) == len(FAMILIES)
        else None
    )
    rows = [
        row
        for task, metrics in merged.items()
        if task not in consumed
        for row in _task_rows(task, metrics, versions[task], shots.get(task))
    ]
    return Evaluation(leaderboard, average, rows, runs)


def _read(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{file}: results file not found") from None
    except OSError as e:
        raise CardError(f"{file}: cannot read results ({e.strerror})") from None
    except ValueError as e:
        raise CardError(f"{file}: not an lm-eval results file (invalid JSON: {e})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise CardError(
            f"{file}: not an lm-eval results file (expected a 'results' mapping of task names "
            "to metrics, as `hubmerge eval` or `lm-eval --output_path` write)"
        )
    return data


def _run_info(file: Path, data: dict[str, Any]) -> RunInfo:
    stamp = data.get("date")
    date = (
        datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d")
        if isinstance(stamp, int | float)
        else None
    )
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    limit = config.get("limit")
    return RunInfo(
        file.name,
        data.get("lm_eval_version"),
        date,
        limit if isinstance(limit, int | float) else None,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _family_score(
    family: Family, results: Mapping[str, Mapping[str, Any]], shots: Mapping[str, int]
) -> float | None:
    """The family's normalised score, or None unless every subtask ran as the leaderboard ran it."""
    normalised = []
    for task, baseline in family.subtasks.items():
        values = [_number(results.get(task, {}).get(metric)) for metric in family.metrics]
        if any(v is None for v in values) or shots.get(task, family.shots) != family.shots:
            return None
        raw = sum(values) / len(values)  # type: ignore[arg-type]
        normalised.append(normalise(raw, baseline))
    return round(sum(normalised) / len(normalised), 2)


def _task_rows(
    task: str, metrics: Mapping[str, Any], version: str, shots: int | None
) -> list[TaskRow]:
    """A row per `<metric>,<filter>` key with a number (stderr keys go with their metric)."""
    rows = []
    for key, value in metrics.items():
        metric, comma, filter_ = key.partition(",")
        number = _number(value)
        if not comma or metric.endswith("_stderr") or number is None:
            continue
        stderr = _number(metrics.get(f"{metric}_stderr,{filter_}"))
        rows.append(TaskRow(task, version, filter_, shots, metric, number, stderr))
    return rows
