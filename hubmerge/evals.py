"""`hubmerge eval`: lm-evaluation-harness on a model folder, saved as lm-eval's own results JSON.

The results file is what `hubmerge card --results` reads: cards never run a model, so evaluating
(minutes to days) and rendering a card (milliseconds) stay separate steps, and a card can be
re-rendered from results computed elsewhere. lm-eval is the optional extra `eval`, imported only
inside `preflight` and `run_eval`.

Before a model is loaded (and, in `hubmerge run`, before the merge), `preflight` imports what
the chosen tasks' code imports, so a missing package is one line naming what to install instead
of a traceback hours later. The run itself is quiet: lm-eval's log lines, hints, prints and
progress bars are silenced, and its model requests drive one progress bar of hubmerge's own.

hubmerge ships offline tasks for the zoo models (`hubmerge/eval_tasks/`, always on the include
path): `hubmerge_zoo_add`, `_reverse` and `_sort` (greedy decoding, exact match) and
`hubmerge_zoo_count` (multiple choice by log-likelihood), or the group `hubmerge_zoo`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hubmerge.card.facts import has_chat_template
from hubmerge.errors import EvalError
from hubmerge.folder import atomic_write

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
#: What installs lm-eval with every package the presets' tasks need.
INSTALL = "pip install 'hubmerge[eval]'"
#: lm-eval model types `--backend` passes through: the module each needs, and how to get it.
BACKENDS: Mapping[str, tuple[str, str]] = {
    "hf": ("transformers", INSTALL),
    "vllm": ("vllm", "pip install 'hubmerge[vllm]' (Linux with an NVIDIA GPU)"),
}
#: Starts a bar for the run's model requests; returns `count(found, done)`, which adds `found`
#: requests to its total and `done` to those finished (lm-eval learns its work in batches).
Counter = Callable[[str], Callable[[int, int], None]]


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


def model_arguments(model_dir: Path, backend: str = "hf", model_args: str = "") -> str:
    """lm-eval's `--model_args` for `backend` on `model_dir`: `pretrained=` and the user's own.

    `model_args` uses lm-eval's names and syntax for the backend (`key=value,...`, such as
    `dtype=bfloat16` or vllm's `tensor_parallel_size=2,gpu_memory_utilization=0.8`), passed on
    as they are; the model is always MODEL_DIR.
    """
    _backend(backend)
    if re.search(r"[,=]", str(model_dir)):
        raise EvalError(f"{model_dir}: lm-eval cannot take a model path with ',' or '='")
    given = [arg.strip() for arg in model_args.split(",") if arg.strip()]
    for arg in given:
        key, equals, _ = arg.partition("=")
        if not equals or not key.strip():
            raise EvalError(f"--model-args: {arg!r} is not key=value (lm-eval's syntax)")
        if key.strip() == "pretrained":
            raise EvalError("--model-args: no pretrained=: the model is MODEL_DIR")
    return ",".join([f"pretrained={model_dir}", *given])


def preflight(
    tasks: Sequence[str], *, include_path: Sequence[Path] = (), backend: str = "hf"
) -> Any:
    """Check that `tasks` can run with `backend`, without running anything; lm-eval's TaskManager.

    lm-eval and the backend must be installed, every task known, and every module the tasks'
    code imports (IFEval's langdetect, MATH's sympy and math_verify, ...) importable: each is
    imported now, as lm-eval would when it builds the tasks.
    """
    if not tasks:
        raise EvalError("no tasks to run: give --tasks or --preset")
    for folder in include_path:
        if not Path(folder).is_dir():
            raise EvalError(f"--include-path {folder}: no such folder")
    try:
        import lm_eval  # noqa: F401  (first: it names the package when that is what is missing)
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as e:
        missing = (e.name or "lm_eval").split(".")[0]
        raise EvalError(f"lm-eval is not installed (no module {missing}): {INSTALL}") from None
    module, install = _backend(backend)
    if importlib.util.find_spec(module) is None:
        raise EvalError(f"--backend {backend} needs {module}, which is not installed: {install}")

    paths = [str(TASKS_DIR), *(str(p) for p in include_path)]
    with _quiet():
        # Indexing lm-eval's ~15,000 built-in task configs takes ~20 s: skip it when every task
        # asked for is in the shipped or given folders.
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not all(task in manager.all_tasks for task in tasks):
            manager = TaskManager(include_path=paths)
        unknown = [task for task in tasks if task not in manager.all_tasks]
        if unknown:
            raise EvalError(f"--tasks: lm-eval has no task {unknown[0]!r} (see `lm-eval ls tasks`)")
        for path, task in _task_files(manager.task_index, tasks, load_yaml).items():
            try:
                load_yaml(path, resolve_func=True)  # imports the code its `!function`s name
            except ImportError as e:
                raise EvalError(_missing_package(task, e)) from None
    return manager


def run_eval(
    model_dir: Path,
    tasks: Sequence[str],
    *,
    output: Path,
    limit: int | None = None,
    batch_size: int | str | None = None,
    device: str | None = None,
    include_path: Sequence[Path] = (),
    apply_chat_template: bool | None = None,
    backend: str = "hf",
    model_args: str = "",
    progress: Counter | None = None,
) -> Path:
    """Evaluate the model in `model_dir` on lm-eval `tasks` and write the results to `output`.

    `backend` is lm-eval's model type (`hf`, or `vllm` for fast generation on NVIDIA GPUs) and
    `model_args` more of its arguments, by lm-eval's names (see `model_arguments`). `limit` caps
    the documents per task (a quick check, not a comparable score). `batch_size` defaults to 8
    with `hf` and to `auto` with `vllm`; `device` to the CPU with `hf` and to vllm's choice.
    `include_path` adds folders of task YAMLs to the shipped ones. The chat template is applied
    when the tokenizer has one, as the Open LLM Leaderboard did for chat models, unless
    `apply_chat_template` says otherwise. `progress` starts the run's progress bar.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"{model_dir}: not a model folder (no config.json)")
    arguments = model_arguments(model_dir, backend, model_args)
    manager = preflight(tasks, include_path=include_path, backend=backend)
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    chat = has_chat_template(model_dir) if apply_chat_template is None else apply_chat_template
    if backend == "hf":
        batch_size, device = batch_size or 8, device or "cpu"
    count = progress("evaluating") if progress else None
    with _quiet(count, backend):
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=arguments,
            tasks=list(tasks),
            batch_size=batch_size or "auto",
            device=device,
            limit=limit,
            task_manager=manager,
            apply_chat_template=chat,
            log_samples=False,
        )
    output = Path(output)
    # The same serialisation as `lm-eval --output_path` (numpy values, callables as text),
    # written aside and renamed: an interrupted write never leaves half a results file.
    atomic_write(
        output,
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
    )
    return output


def _backend(backend: str) -> tuple[str, str]:
    """The module `backend` needs and how to install it; an error for an unknown backend."""
    if backend not in BACKENDS:
        raise EvalError(f"--backend: unknown backend {backend!r} (one of: {', '.join(BACKENDS)})")
    return BACKENDS[backend]


def _task_files(
    index: Mapping[str, Any], tasks: Sequence[str], load_yaml: Callable[..., Any]
) -> dict[Path, str]:
    """The YAML file of every task `tasks` run (through groups and tags), with the task asked
    for that runs it."""
    files: dict[Path, str] = {}
    seen: set[str] = set()

    def visit(name: str, asked: str) -> None:
        entry = index.get(name)
        if entry is None or name in seen:
            return  # inline tasks are defined in their group's file, which is listed
        seen.add(name)
        kind = entry.kind.name
        if kind == "TAG":
            for member in sorted(entry.tags):
                visit(member, asked)
            return
        if entry.yaml_path is not None:
            files.setdefault(Path(entry.yaml_path), asked)
        if kind == "GROUP":
            config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}
            for member in _members(config.get("task")):
                visit(member, asked)

    for task in tasks:
        visit(task, task)
    return files


def _members(items: Any) -> Iterator[str]:
    """The task and group names in a group's `task:` list (inline groups included)."""
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for key in ("task", "group"):
                if isinstance(item.get(key), str):
                    yield item[key]
            if isinstance(item.get("task"), list):
                yield from _members(item["task"])


def _missing_package(task: str, error: ImportError) -> str:
    """One line: which package `task`'s code needs, and the pip command that installs it."""
    cause: BaseException | None = error
    module = None
    while cause is not None and module is None:  # tasks may re-raise without the name
        module = getattr(cause, "name", None)
        cause = cause.__cause__ or cause.__context__
    module = (module or "").split(".")[0]
    extra = _lm_eval_extra(module) if module else None
    needs = f"the Python package {module}" if module else "a Python package that is missing"
    if extra:
        needs += f" (lm-eval's `{extra}` extra)"
    if any(task in preset for preset in PRESETS.values()):
        install = INSTALL
    elif extra:
        install = f"pip install 'lm-eval[{extra}]'"
    else:
        install = f"pip install {module}" if module else "see the task's README in lm-eval"
    return f"task {task} needs {needs}: {install}"


def _lm_eval_extra(module: str) -> str | None:
    """The extra of lm-eval whose requirements provide `module` (e.g. langdetect: ifeval)."""
    wanted = module.lower().replace("_", "-")
    for requirement in importlib.metadata.requires("lm_eval") or []:
        match = re.match(r"\s*([A-Za-z0-9._-]+).*extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if match:
            name = match.group(1).lower().replace("_", "-")
            if name == wanted or name.startswith(wanted + "-"):
                return match.group(2)
    return None


@contextlib.contextmanager
def _quiet(
    count: Callable[[int, int], None] | None = None, backend: str | None = None
) -> Iterator[None]:
    """lm-eval without its noise; the requests of its `backend` model counted by `count`.

    Silenced: lm-eval's log lines (hints such as `--metadata`), prints and warnings, the
    `fatal: not a git repository` of its git lookup (the folder's commit means nothing for a
    model), and the progress bars of lm-eval, datasets, transformers and huggingface_hub.
    Errors still surface as exceptions.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for name in ("lm_eval", "datasets", "transformers", "huggingface_hub", "accelerate"):
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        stack.enter_context(_library_bars_off())
        stack.enter_context(_lm_eval_bars(count, backend))
        yield


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """The progress bars of datasets, transformers and huggingface_hub off, then as they were."""
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    on = [
        (datasets.are_progress_bars_disabled, datasets.enable_progress_bars),
        (hub_utils.are_progress_bars_disabled, hub_utils.enable_progress_bars),
    ]
    restore = [enable for disabled, enable in on if not disabled()]
    if transformers_logging.is_progress_bar_enabled():
        restore.append(transformers_logging.enable_progress_bar)
    datasets.disable_progress_bars()
    hub_utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for enable in restore:
            enable()


@contextlib.contextmanager
def _lm_eval_bars(count: Callable[[int, int], None] | None, backend: str | None) -> Iterator[None]:
    """lm-eval's tqdm bars made silent; those of its model (requests run) feed `count`.

    lm-eval's modules hold `tqdm` as a global, swapped here for the time of the run (tqdm's own
    stays: a module imported meanwhile would keep the swapped one); the git lookup is swapped
    the same way.
    """
    import tqdm
    from lm_eval import evaluator
    from lm_eval.api.registry import get_model

    if backend is not None:
        get_model(backend)  # imports the model's module, whose bars are swapped below

    class Silent(tqdm.tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    class Counted(Silent):
        """A model's request bar: its total joins the run's when it first advances."""

        def update(self, n: float | None = 1) -> bool | None:
            if count is not None and n:
                if not getattr(self, "_counted", False):
                    self._counted = True
                    count(int(self.total or 0), 0)
                count(0, int(n))
            return None

    swaps: list[tuple[Any, str, Any]] = [(evaluator, "get_git_commit_hash", _no_commit)]
    for name, module in list(sys.modules.items()):
        if name.startswith("lm_eval.") and getattr(module, "tqdm", None) is tqdm.tqdm:
            swaps.append(
                (module, "tqdm", Counted if name.startswith("lm_eval.models.") else Silent)
            )
    previous = [(module, attribute, getattr(module, attribute)) for module, attribute, _ in swaps]
    for module, attribute, value in swaps:
        setattr(module, attribute, value)
    try:
        yield
    finally:
        for module, attribute, value in previous:
            setattr(module, attribute, value)


def _no_commit() -> None:
    """lm-eval's `git_hash`: the commit of the folder it runs in, which is not the model's."""
    return None
