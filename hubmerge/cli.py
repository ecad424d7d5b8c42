"""The `hubmerge` command: a thin typer shell over the Python API.

Every `HubmergeError` becomes one line on stderr and exit code 2. Heavy libraries (torch,
transformers) are imported inside the commands that need them, so `hubmerge merge` starts fast.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hubmerge.display import Display
from hubmerge.errors import CardError, HubError, HubmergeError

if TYPE_CHECKING:  # the command starts without loading what it prints
    from hubmerge.card.results import Evaluation
    from hubmerge.config import MergekitConfig
    from hubmerge.hub import PublishResult
    from hubmerge.plan import MergePlan

app = typer.Typer(
    help="Compose language models from other models' layers and publish them to the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The tiny trained models shipped with hubmerge.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
# No emoji codes: messages quote names and devices (`cuda:x:` is not an emoji).
console = Console(stderr=True, emoji=False)
out = Console(emoji=False)

F = TypeVar("F", bound=Callable[..., Any])


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _friendly(func: F) -> F:
    """Turn hubmerge's own errors into one line and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HubmergeError as e:
            # Escaped: messages quote user text and pip extras (`hubmerge[eval]`), not markup.
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except Exception as e:
            # The last resort: every input is meant to fail as a HubmergeError above, so this is
            # a bug; still one line (its text could quote a file), the traceback on request.
            if os.environ.get("HUBMERGE_DEBUG") == "1":
                raise
            console.print(
                f"[bold red]error:[/] unexpected {type(e).__name__} (a bug in hubmerge: please "
                "report it; HUBMERGE_DEBUG=1 shows the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _interruptible(kept: Callable[..., str]) -> Callable[[F], F]:
    """Ctrl-C ends the command with one line, what was kept and how to resume, and exit 130.

    `kept` gets the command's parameters and says what an interrupted run leaves behind.
    """

    def decorate(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except KeyboardInterrupt:
                _log(f"interrupted: {kept(**kwargs)}")
                raise typer.Exit(130) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _olm_kept(out_dir: Path) -> str | None:
    """What an interrupted OLM search leaves: its finished positions, resumed by a re-run."""
    from hubmerge.folder import OLM_REPORT_FILE
    from hubmerge.merge import work_dir

    if (work_dir(out_dir) / OLM_REPORT_FILE).is_file():
        return (
            f"the OLM search so far is kept in {work_dir(out_dir)}; run the same command again "
            "to resume it"
        )
    return None


def _merge_kept(out_dir: Path, **_: Any) -> str:
    return _olm_kept(out_dir) or (
        f"nothing was written ({out_dir} is as it was); run the same command again to start over"
    )


def _run_kept(out_dir: Path, **_: Any) -> str:
    from hubmerge.run import finished_stages

    done = finished_stages(out_dir)
    if done:
        return (
            f"the finished stages ({', '.join(done)}) are kept in {out_dir}; run the same "
            "command again to resume after them"
        )
    return _merge_kept(out_dir)


def _demo_kept(out_dir: Path, **_: Any) -> str:
    if Path(out_dir).is_dir():
        return (
            f"the merged model is kept in {out_dir}; `hubmerge demo {out_dir} --force` "
            "merges and compares again"
        )
    return _merge_kept(out_dir)


def _version(value: bool) -> None:
    if value:
        from hubmerge import __version__

        typer.echo(f"hubmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Compose language models from other models' layers and publish them to the Hub."""


def print_plan(plan: MergePlan, *, verbose: bool = False) -> None:
    """The layer map as a table: models by the names the card uses (Hub id, or local folder
    name), runs of layers taken in order from one model as one row; `verbose`: every layer,
    and models as the config names them (full paths).
    """
    from hubmerge.plan import compact_rows
    from hubmerge.sources import public_name

    table = Table(title=f"merge plan ({plan.method}, {len(plan.layers)} layers)")
    for column in ("output", "source model", "source layer", "scales"):
        table.add_column(column)
    rows = plan.rows() if verbose else compact_rows(plan.renamed(public_name).rows())
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    out.print(table)


def print_parameters(config: MergekitConfig) -> None:
    """A mergekit method's parameters, per model or slice: what decides its blended tensors."""
    from hubmerge.methods.mergekit_run import parameter_tables

    out.print(f"merge: {config.merge_method} (computed by mergekit)")
    for spec in parameter_tables(config.mergekit_data()):
        table = Table(title=spec["title"])
        for column in spec["columns"]:
            table.add_column(column)
        for row in spec["rows"]:
            table.add_row(*(escape(cell) for cell in row))
        out.print(table)


@app.command()
@_friendly
@_interruptible(_merge_kept)
def merge(
    config: Annotated[
        Path, typer.Argument(help="Merge config (YAML; mergekit passthrough works).")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (created when complete).")],
    dry_run: Annotated[bool, typer.Option(help="Print the plan; write nothing.")] = False,
    dtype: Annotated[DType | None, typer.Option(help="Output dtype (overrides out_dtype).")] = None,
    out_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB.")] = "5GB",
    device: Annotated[str | None, typer.Option(help="Where NER/OLM compute (cpu, cuda).")] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Load .bin checkpoints (weights_only).")
    ] = False,
    restart: Annotated[bool, typer.Option(help="Discard a saved unfinished OLM run.")] = False,
    card: Annotated[bool, typer.Option(help="Write README.md, the model card.")] = True,
    verbose: Annotated[
        bool, typer.Option(help="Plan table: every layer, models by their full paths.")
    ] = False,
) -> None:
    """Build a model from other models' layers, as CONFIG describes, into OUT_DIR."""
    from hubmerge.folder import RECIPE_FILE
    from hubmerge.merge import merge as run_merge
    from hubmerge.writer import parse_size

    shard_size = parse_size(out_shard_size)
    with Display(console) as display:
        result = run_merge(
            config,
            out_dir,
            dry_run=dry_run,
            dtype=dtype.value if dtype else None,
            shard_size=shard_size,
            force=force,
            allow_pickle=allow_pickle,
            device=device,
            restart=restart,
            progress=display,
            reporter=display,
            card=card,
        )
    from hubmerge.config import MergekitConfig

    if isinstance(result.config, MergekitConfig):
        print_parameters(result.config)
    else:
        print_plan(result.plan, verbose=verbose)
    if result.out_dir is not None:
        out.print(f"wrote {result.out_dir} (recipe: {RECIPE_FILE})")


@app.command("card")
@_friendly
def card_command(
    model_dir: Annotated[
        Path | None, typer.Argument(help="A `hubmerge merge` output folder.", show_default=False)
    ] = None,
    results: Annotated[
        list[Path] | None,
        typer.Option("--results", help="lm-eval results JSON (repeat for several files)."),
    ] = None,
    template: Annotated[
        Path | None, typer.Option(help="Jinja2 card template (default: hubmerge's).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Card file (default MODEL_DIR/README.md).")
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Write nothing; exit 1 with a diff if the card is stale.")
    ] = False,
    all_dirs: Annotated[
        list[Path] | None,
        typer.Option(
            "--all",
            metavar="DIR",
            help="Every model folder in DIR (or DIR itself), from its config.yaml and "
            "results/*.json; repeatable.",
        ),
    ] = None,
    repo_id: Annotated[
        str | None,
        typer.Option(
            "--repo-id",
            help="The Hub repo the card is for: its title and usage snippet name it "
            "(default: the config's hub.repo_id, else the folder's name).",
        ),
    ] = None,
) -> None:
    """Render MODEL_DIR's model card (README.md) with its lineage, recipe, layer map and results.

    Exit codes: 0 cards up to date (or written), 1 a card is stale (--check), 2 an error.
    """
    from hubmerge.card import check_card, write_card

    if all_dirs:
        if model_dir or results or output or repo_id:
            raise CardError(
                "--all renders each folder from its own files: no MODEL_DIR, --results, -o "
                "or --repo-id"
            )
        raise typer.Exit(_card_all(all_dirs, check=check, template=template))
    if model_dir is None:
        raise CardError("give MODEL_DIR, or --all DIR for every model folder in DIR")
    if check:
        diff = check_card(
            model_dir, results=results or (), template=template, output=output, repo_id=repo_id
        )
        if diff is not None:
            out.print(diff, highlight=False, markup=False, soft_wrap=True)
            console.print("the card is stale: run `hubmerge card` without --check to update it")
            raise typer.Exit(1)
        out.print("the card is up to date")
        return
    if repo_id:
        from hubmerge.hub import check_repo_id

        check_repo_id(repo_id)
    path = write_card(
        model_dir, results=results or (), template=template, output=output, repo_id=repo_id
    )
    out.print(f"wrote {path}")


def _card_all(dirs: list[Path], *, check: bool, template: Path | None) -> int:
    """`hubmerge card --all`: a line per model folder as it is done (and diffs); the exit code."""
    from hubmerge.card.folders import Status, log_lines, model_folders, refresh

    # On GitHub Actions, problems also become annotations on the pull request.
    annotate = os.environ.get("GITHUB_ACTIONS") == "true"
    counts: Counter[Status] = Counter()
    for folder in dict.fromkeys(f for d in dirs for f in model_folders(d)):
        report = refresh(folder, check=check, template=template)
        counts[report.status] += 1
        for line in log_lines(report, annotate=annotate):
            typer.echo(line)  # as is: a diff or an annotation must not pass through markup
    summary = ", ".join(f"{n} {status.value}" for status, n in counts.items())
    _log(f"{counts.total()} model folders: {summary}")
    if counts[Status.ERROR]:
        return 2
    if counts[Status.STALE]:
        again = " ".join(f"--all {d}" for d in dirs)
        _log(f"to update: `hubmerge card {again}`, then commit")
        return 1
    return 0


@app.command("eval")
@_friendly
def eval_command(
    model_dir: Annotated[Path, typer.Argument(help="Model folder to evaluate.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results JSON to write.")],
    tasks: Annotated[
        list[str] | None,
        typer.Option(help="lm-eval tasks, comma-separated or repeated (hubmerge_zoo is shipped)."),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Named task list: leaderboard (Open LLM v2) or zoo.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="At most N documents per task (a quick check).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="lm-eval model type: hf (transformers) or vllm (NVIDIA GPUs).")
    ] = "hf",
    model_args: Annotated[
        str,
        typer.Option(
            help="More lm-eval model arguments, by lm-eval's names: key=value,... "
            "(e.g. dtype=bfloat16, or tensor_parallel_size=2 with vllm)."
        ),
    ] = "",
    batch_size: Annotated[
        str | None, typer.Option(help="Batch size, or auto (default: 8 with hf, auto with vllm).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, mps ... (default: cpu with hf).")
    ] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option(help="Folder of extra lm-eval task YAMLs (repeatable).")
    ] = None,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="Prompt through the tokenizer's chat template (default: when it has one).",
        ),
    ] = None,
) -> None:
    """Run lm-evaluation-harness on MODEL_DIR, write lm-eval's results JSON and show the scores."""
    from hubmerge.card.results import load_results
    from hubmerge.evals import resolve_tasks, run_eval

    with Display(console) as display:
        path = run_eval(
            model_dir,
            resolve_tasks(tasks or (), preset),
            output=output,
            limit=limit,
            batch_size=int(batch_size) if batch_size and batch_size.isdigit() else batch_size,
            device=device,
            include_path=include_path or (),
            apply_chat_template=chat_template,
            backend=backend,
            model_args=model_args,
            progress=display.counter,
        )
    print_scores(load_results([path]))
    out.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


def print_scores(evaluation: Evaluation) -> None:
    """The rows the card's evaluation section will show: the leaderboard's, then other tasks."""
    if evaluation.leaderboard:
        table = Table("Metric", "Value", title="Open LLM Leaderboard v2 (normalised)")
        table.columns[1].justify = "right"
        if evaluation.average is not None:
            table.add_row("Avg.", f"{evaluation.average:.2f}")
        for label, score in evaluation.leaderboard:
            table.add_row(escape(label), f"{score:.2f}")
        out.print(table)
    if evaluation.tasks:
        table = Table("Task", "Filter", "n-shot", "Metric", "Value", "Stderr")
        for column in table.columns[2:3] + table.columns[4:]:
            column.justify = "right"
        for row in evaluation.tasks:
            shots = "-" if row.shots is None else str(row.shots)
            stderr = "-" if row.stderr is None else f"{row.stderr:.4f}"
            cells = (row.task, row.filter, shots, row.metric, f"{row.value:.4f}", stderr)
            table.add_row(*(escape(cell) for cell in cells))
        out.print(table)
    for run in evaluation.runs:
        if run.limit:
            out.print(
                f"limited to {run.limit:g} documents per task: a quick check, not comparable "
                "with full runs (the card shows it, its model-index leaves it out)",
                highlight=False,
                markup=False,
            )


RepoId = Annotated[
    str | None,
    typer.Option("--repo-id", help="Hub repo: ORG/NAME (default: the folder's hub.repo_id)."),
]
Private = Annotated[bool, typer.Option(help="Create the repo private (if it does not exist).")]
Token = Annotated[
    str | None,
    typer.Option(help="Hub token (default: HF_TOKEN, then the stored login); never printed."),
]


@app.command()
@_friendly
def publish(
    model_dir: Annotated[Path, typer.Argument(help="Model folder to upload, as it is.")],
    repo_id: RepoId = None,
    private: Private = False,
    revision: Annotated[str | None, typer.Option(help="Branch (created if needed).")] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="Commit title.")] = None,
    token: Token = None,
    oidc: Annotated[
        bool,
        typer.Option(
            help="In CI: a short-lived token for the repo from the Hub's Trusted Publishers "
            "(GitHub Actions: needs `permissions: id-token: write`)."
        ),
    ] = False,
    card_only: Annotated[
        bool, typer.Option(help="Upload only the card and its images, to an existing repo.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="List the files and the card's metadata; no network.")
    ] = False,
) -> None:
    """Create the Hub repo if needed and upload MODEL_DIR to it in one commit.

    Without --repo-id, the folder's config says where (`hub.repo_id`) and how (`hub.private`).

    When the Hub already has every file, no commit is made and the output says `unchanged`.
    """
    from hubmerge.hub import configured_hub
    from hubmerge.hub import publish as run_publish

    if repo_id is None:
        settings = configured_hub(model_dir)
        if not settings.repo_id:
            raise HubError(f"{model_dir}: no hub.repo_id in its config: pass --repo-id ORG/NAME")
        repo_id, private = settings.repo_id, private or settings.private
    result = run_publish(
        model_dir,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
        oidc=oidc,
        card_only=card_only,
        dry_run=dry_run,
        log=_log,
    )
    print_published(result)


@app.command("run")
@_friendly
@_interruptible(_run_kept)
def run_command(
    config: Annotated[
        Path, typer.Argument(help="Merge config (YAML), with optional hub: and card:.")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Output folder; a re-run resumes in it.")],
    eval_tasks: Annotated[
        str | None, typer.Option("--eval", help="lm-eval tasks to run, comma-separated.")
    ] = None,
    eval_preset: Annotated[
        str | None, typer.Option(help="Named task list instead: leaderboard or zoo.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most N documents per task.")] = None,
    push: Annotated[
        str | None, typer.Option(help="Publish to ORG/NAME (default: the config's hub.repo_id).")
    ] = None,
    private: Private = False,
    token: Token = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (merge and eval).")] = None,
    force: Annotated[
        bool, typer.Option(help="Start over: merge again, replacing OUT_DIR.")
    ] = False,
) -> None:
    """Merge, evaluate, write the card and publish, in one go; a re-run resumes where it failed."""
    from hubmerge.run import run

    with Display(console) as display:
        result = run(
            config,
            out_dir,
            tasks=[eval_tasks] if eval_tasks else [],
            preset=eval_preset,
            limit=limit,
            push=push,
            private=private,
            token=token,
            force=force,
            device=device,
            progress=display,
            reporter=display,
            eval_progress=display.counter,
            log=_log,
        )
    out.print(f"published {result.url}" if result.url else f"wrote {result.out_dir}")


def _log(message: str) -> None:
    """One line of progress on stderr (hubmerge's messages quote paths, never markup)."""
    console.print(escape(message), highlight=False, soft_wrap=True)


def print_published(result: PublishResult) -> None:
    """A dry run's files, sizes and card metadata; a real run's model (and PR) URL."""
    import yaml
    from rich.filesize import decimal

    if result.frontmatter is None:
        console.print("warning: no README.md, so the repo will have no model card")
    if result.changed is False:
        message = f"unchanged {result.url} (the Hub has these files: no commit)"
        out.print(message, highlight=False, markup=False, soft_wrap=True)
        return
    if not result.dry_run:
        what = "the card of " if result.card_only else ""
        out.print(f"published {what}{result.url}", highlight=False, markup=False, soft_wrap=True)
        if result.pr_url:
            out.print(f"pull request {result.pr_url}", highlight=False, markup=False)
        return
    table = Table("file", "size")
    table.columns[1].justify = "right"
    for file in result.files:
        table.add_row(escape(file.path), decimal(file.size))
    out.print(table)
    total = decimal(sum(f.size for f in result.files))
    private = " (private)" if result.private else ""
    out.print(f"would upload {len(result.files)} files, {total}, to {result.url}{private}")
    if result.frontmatter is not None:
        out.print("README.md metadata:", highlight=False)
        metadata = yaml.safe_dump(result.frontmatter, sort_keys=False)
        out.print(metadata, highlight=False, markup=False, end="")


@app.command()
@_friendly
@_interruptible(_demo_kept)
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Where the merged model goes.")] = Path(
        "demo-out"
    ),
    force: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Merge the shipped zoo with OLM (offline, CPU) and compare every model on held-out data."""
    from hubmerge.demo import MERGED, composite, run_demo

    with Display(console) as display:
        result = run_demo(out_dir, force=force, reporter=display)
    print_plan(result.merge.plan)
    table = Table(title="held-out exact-match accuracy (samples no choice was made on)")
    tasks = list(next(iter(result.accuracy.values())))
    for column in ("model", *tasks, "composite"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, scores in result.accuracy.items():
        cells = [f"{scores[t]:.3f}" for t in tasks] + [f"{composite(scores):.3f}"]
        table.add_row(label, *cells, style="bold" if label == MERGED else None)
    out.print(table)
    out.print(
        f"OLM merge vs the best donor ({result.best_donor}): "
        f"{100 * result.margin:+.1f} points composite"
    )
    out.print(
        f"wrote {result.merge.out_dir}: weights, {len(result.merge.plan.layers)} layers chosen by "
        "OLM (merge_report.json), recipe (mergekit_config.yml) and card (README.md)"
    )


@zoo_app.command("list")
@_friendly
def zoo_list() -> None:
    """The zoo's models and datasets, with each model's held-out accuracy per task."""
    from hubmerge import zoo

    table = Table(title="hubmerge zoo (held-out exact match)")
    table.add_column("model")
    table.add_column("parent")
    for task in zoo.TASKS:
        table.add_column(task, justify="right")
    table.add_column("path")
    for model in zoo.list_models():
        accuracy = [f"{model.accuracy.get(t, float('nan')):.3f}" for t in zoo.TASKS]
        table.add_row(model.name, model.parent or "-", *accuracy, str(model.path))
    out.print(table)
    for task in zoo.TASKS:
        for split in zoo.SPLITS:
            out.print(f"dataset {task}/{split}: {zoo.dataset_path(task, split)}")


def main() -> None:
    """Console-script entry point."""
    app()
