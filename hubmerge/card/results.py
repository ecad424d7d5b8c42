"""lm-eval results files -> the card's evaluation tables and its `model-index`.

Open LLM Leaderboard v2 tasks are normalised exactly as the leaderboard's notebook did, with
`norm(raw, lb) = max(raw - lb, 0) / (1 - lb) * 100` and lb the random-guess baseline, each family
rounded to 2 decimals; `Avg.` is the mean of the six rounded scores. BBH and MuSR normalise every
subtask, then take the unweighted mean. MATH Lvl 5 and GPQA normalise lm-eval's group row once
(`leaderboard_math_hard`, `leaderboard_gpqa`: means over the subtasks weighted by their sizes);
a file without the group row gets the same mean rebuilt from the subtasks and `n-samples`.
A family is shown that way only when every one of its subtasks is present with the leaderboard's
few-shot count: a partial or differently-run family would not be the leaderboard's number, so
its subtasks are listed as plain tasks instead, like every other task (raw metric and stderr).

Results of a run limited to N documents per task (`--limit`) are shown in the card's body,
marked as limited, but kept out of `model-index`: the Hub shows `model-index` as the model's
scores, and a limited run is a quick check, not a score comparable with full runs.
"""

from __future__ import annotations

import datetime
import json
import posixpath
import re
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
    #: lm-eval's group row to normalise once (its size-weighted mean over the subtasks), for
    #: the families the leaderboard scores that way; None: normalise each subtask, then average.
    group: str | None = None


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
        group="leaderboard_math_hard",
    ),
    Family(
        "GPQA (0-shot)",
        0,
        {f"leaderboard_gpqa_{name}": 0.25 for name in ("diamond", "extended", "main")},
        ("acc_norm,none",),
        "Idavidrein/gpqa",
        "acc_norm",
        "acc_norm",
        group="leaderboard_gpqa",
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
#: lm-eval's group rows for the leaderboard: consumed with their families, never listed alone.
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
    #: Leaderboard labels and task names measured by a limited run: shown, not in `model-index`.
    limited: frozenset[str] = frozenset()

    def eval_results(self) -> list[EvalResult]:
        """The `model-index` entries: leaderboard families first, then every other metric.

        Limited runs are left out (see the module's docstring)."""
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
            if label not in self.limited
        ]
        for row in self.tasks:
            if row.task in self.limited:
                continue
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


@dataclass
class _Runs:
    """The results files read together, by task: each task comes from one file."""

    results: dict[str, dict[str, Any]]
    #: lm-eval's group rows (`groups`, also in `results` since lm-eval 0.4.3).
    groups: dict[str, dict[str, Any]]
    versions: dict[str, str]
    shots: dict[str, int]
    #: Documents evaluated per task (`n-samples` `effective`, after any limit).
    sizes: dict[str, int]
    limited: set[str]


def load_results(files: Sequence[Path]) -> Evaluation:
    """Read lm-eval results files; a task may appear in only one of them."""
    runs = _Runs({}, {}, {}, {}, {}, set())
    owner: dict[str, Path] = {}
    infos = []
    for file in files:
        data = _read(Path(file))
        info = _run_info(Path(file), data)
        infos.append(info)
        for group, metrics in _mapping(data, "groups").items():
            if isinstance(metrics, dict):
                runs.groups.setdefault(group, metrics)
        samples = _mapping(data, "n-samples")
        for task, metrics in data["results"].items():
            if task in owner:
                raise CardError(f"{file}: task {task} is also in {owner[task]}; give it once")
            owner[task] = Path(file)
            runs.results[task] = metrics
            runs.versions[task] = str(data.get("versions", {}).get(task, "-"))
            if isinstance(data.get("n-shot", {}).get(task), int):
                runs.shots[task] = data["n-shot"][task]
            sampled = samples.get(task)
            count = sampled.get("effective") if isinstance(sampled, dict) else None
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                runs.sizes[task] = count
            if info.limit is not None:
                runs.limited.add(task)

    leaderboard: list[tuple[str, float]] = []
    limited = set(runs.limited)
    consumed = set(LEADERBOARD_GROUPS)
    for family in FAMILIES:
        score = _family_score(family, runs)
        if score is not None:
            leaderboard.append((family.label, score))
            consumed |= set(family.subtasks)
            if runs.limited & set(family.subtasks):
                limited.add(family.label)
    average = (
        round(sum(score for _, score in leaderboard) / len(FAMILIES), 2)
        if len(leaderboard) == len(FAMILIES)
        else None
    )
    rows = [
        row
        for task, metrics in runs.results.items()
        if task not in consumed
        for row in _task_rows(task, metrics, runs.versions[task], runs.shots.get(task))
    ]
    return Evaluation(leaderboard, average, rows, infos, frozenset(limited))


#: What lm-eval records about the machine that ran it: the environment dump (user, paths,
#: packages, hardware) and the git commits of the folder it ran in.
MACHINE_KEYS = ("pretty_env_info", "git_hash", "upper_git_hash")
#: Where task YAMLs shipped with a package live: kept from there on, as a relative path.
_TASK_ROOTS = ("lm_eval/tasks/", "hubmerge/eval_tasks/")


def is_results(data: Any) -> bool:
    """Whether parsed JSON is an lm-eval results file (`results` and lm-eval's run records)."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("results"), dict)
        and any(key in data for key in ("lm_eval_version", "n-shot", "configs"))
    )


def shareable_results(data: dict[str, Any], model_name: str) -> dict[str, Any]:
    """An lm-eval results file as it may be published: nothing about the machine that ran it.

    lm-eval records the environment (`MACHINE_KEYS`), the model's local path (`config.model`,
    `pretrained=` in `config.model_args`) and each task's absolute file paths (its YAML's
    `config_source`, local `data_files`). The copy drops the first, names the model
    `model_name` and keeps only the package-relative part (`lm_eval/tasks/...`) or the file name
    of every absolute path; everything the card reads is kept as it was.
    """
    shared = {key: value for key, value in data.items() if key not in MACHINE_KEYS}
    config = shared.get("config")
    if isinstance(config, dict):
        config = dict(config)
        if isinstance(config.get("model"), str) and _is_path(config["model"]):
            config["model"] = model_name
        if isinstance(config.get("model_args"), str):
            config["model_args"] = ",".join(
                f"pretrained={model_name}" if arg.startswith("pretrained=") else arg
                for arg in config["model_args"].split(",")
            )
        shared["config"] = config
    return {key: _without_paths(value) for key, value in shared.items()}


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    if isinstance(value, str) and _is_path(value):
        path = value.replace("\\", "/")
        for root in _TASK_ROOTS:
            if f"/{root}" in path:
                return root + path.rsplit(f"/{root}", 1)[1]
        return posixpath.basename(path)
    return value


def _is_path(text: str) -> bool:
    """An absolute path of a file or folder: POSIX (two levels or more), Windows drive or UNC."""
    if "\n" in text or len(text) > 4096:
        return False
    return bool(re.match(r"/[^/]+/|\\\\|[A-Za-z]:[\\/]", text))


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
    limit = _mapping(data, "config").get("limit")
    return RunInfo(
        file.name,
        data.get("lm_eval_version"),
        date,
        limit if isinstance(limit, int | float) else None,
    )


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """`data[key]` when it is a mapping, else an empty one (results files are untrusted)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _family_score(family: Family, runs: _Runs) -> float | None:
    """The family's normalised score, or None unless every subtask ran as the leaderboard ran it."""
    raw: dict[str, float] = {}
    for task in family.subtasks:
        values = [_number(runs.results.get(task, {}).get(metric)) for metric in family.metrics]
        if any(v is None for v in values) or runs.shots.get(task, family.shots) != family.shots:
            return None
        raw[task] = sum(values) / len(values)  # type: ignore[arg-type]
    if family.group is None:
        normalised = [normalise(raw[task], lb) for task, lb in family.subtasks.items()]
        return round(sum(normalised) / len(normalised), 2)
    # One baseline for the whole family, so the group row can be normalised once.
    (baseline,) = set(family.subtasks.values())
    metric = family.metrics[0]
    row = runs.results.get(family.group) or runs.groups.get(family.group) or {}
    mean = _number(row.get(metric))
    if mean is None:  # lm-eval's own size-weighted mean, rebuilt from the subtasks
        if not all(task in runs.sizes for task in family.subtasks):
            return None
        total = sum(runs.sizes[task] for task in family.subtasks)
        mean = sum(raw[task] * runs.sizes[task] for task in family.subtasks) / total
    return round(normalise(mean, baseline), 2)


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
