"""`hubmerge eval`: lm-evaluation-harness on a model folder, saved as lm-eval's own results JSON.

The results file is what `hubmerge card --results` reads: cards never run a model, so evaluating
(minutes to days) and rendering a card (milliseconds) stay separate steps, and a card can be
re-rendered from results computed elsewhere. lm-eval is the optional extra `eval`, imported only
inside `run_eval`.

hubmerge ships offline tasks for the zoo models (`hubmerge/eval_tasks/`, always on the include
path): `hubmerge_zoo_add`, `_reverse` and `_sort` (greedy decoding, exact match) and
`hubmerge_zoo_count` (multiple choice by log-likelihood), or the group `hubmerge_zoo`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hubmerge.card.facts import has_chat_template
from hubmerge.errors import EvalError

#: The Open LLM Leaderboard v2 tasks (lm-eval names); `--preset leaderboard`.
LEADERBOARD_TASKS = (
    "leaderboard_ifeval",
    "leaderboard_bbh",
    "leaderboard_math_hard",
    "leaderboard_gpqa",
    "leaderboard_musr",
    "leaderboard_mmlu_pro",
)
PRESETS: dict[str, tuple[str, ...]] = {"leaderboard": LEADERBOARD_TASKS, "zoo": ("hubmerge_zoo",)}
TASKS_DIR = Path(__file__).parent / "eval_tasks"


def resolve_tasks(tasks: Sequence[str], preset: str | None) -> list[str]:
    """`--tasks` (each may be comma-separated, as lm-eval takes them) or `--preset`'s tasks."""
    named = [t.strip() for group in tasks for t in group.split(",") if t.strip()]
    if named and preset:
        raise EvalError("give --tasks or --preset, not both")
    if preset is None:
        return named
    if preset not in PRESETS:
        raise EvalError(f"--preset: unknown preset {preset!r} (one of: {', '.join(PRESETS)})")
    return list(PRESETS[preset])


def run_eval(
    model_dir: Path,
    tasks: Sequence[str],
    *,
    output: Path,
    limit: int | None = None,
    batch_size: int | str = 8,
    device: str | None = "cpu",
    include_path: Sequence[Path] = (),
    apply_chat_template: bool | None = None,
) -> Path:
    """Evaluate the model in `model_dir` on lm-eval `tasks` and write the results to `output`.

    `limit` caps the documents per task (a quick check, not a comparable score). `device`
    None means the CPU.
    `include_path` adds folders of task YAMLs to the shipped ones. The chat template is applied
    when the tokenizer has one, as the Open LLM Leaderboard did for chat models, unless
    `apply_chat_template` says otherwise.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: not a model folder (no config.json)")
    if not tasks:
        raise EvalError("no tasks to run: give --tasks or --preset")
    for folder in include_path:
        if not Path(folder).is_dir():
            raise EvalError(f"--include-path {folder}: no such folder")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as e:
        raise EvalError(
            f"lm-eval is not installed (no module {e.name}): pip install 'hubmerge[eval]'"
        ) from None

    paths = [str(TASKS_DIR), *(str(p) for p in include_path)]
    # Indexing lm-eval's ~15,000 built-in task configs takes ~20 s: skip it when every task
    # asked for is in the shipped or given folders.
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(task in manager.all_tasks for task in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: lm-eval has no task {unknown[0]!r} (see `lm-eval ls tasks`)")

    chat = has_chat_template(model_dir) if apply_chat_template is None else apply_chat_template
    model = HFLM(pretrained=str(model_dir), device=device or "cpu", batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        limit=limit,
        task_manager=manager,
        apply_chat_template=chat,
        log_samples=False,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The same serialisation as `lm-eval --output_path` (numpy values, callables as text).
    output.write_text(
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
    )
    return output
