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
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hubmerge.display import Display
from hubmerge.errors import CardError, HubError, HubmergeError

app = typer.Typer(
    help="Compose language models from other models' layers and publish them to the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The tiny trained models shipped with hubmerge.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)
out = Console()

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

    return wrapper  # type: ignore[return-value]


def print_plan(plan: Any) -> None:
    table = Table(title=f"merge plan ({plan.method}, {len(plan.layers)} layers)")
    for column in ("output", "source model", "source layer", "scales"):
        table.add_column(column)
    for row in plan.rows():
        table.add_row(*row)
    out.print(table)


@app.command()
@_friendly
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
) -> None:
    """Build a model from other models' layers, as CONFIG describes, into OUT_DIR."""
    from hubmerge.merge import RECIPE_FILE
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
    print_plan(result.plan)
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
) -> None:
    """Render MODEL_DIR's model card (README.md) with its lineage, recipe, layer map and results.

    Exit codes: 0 cards up to date (or written), 1 a card is stale (--check), 2 an error.
    """
    from hubmerge.card import check_card, write_card

    if all_dirs:
        if model_dir or results or output:
            raise CardError(
                "--all renders each folder from its own files: no MODEL_DIR, --results or -o"
            )
        raise typer.Exit(_card_all(all_dirs, check=check, template=template))
    if model_dir is None:
        raise CardError("give MODEL_DIR, or --all DIR for every model folder in DIR")
    if check:
        diff = check_card(model_dir, results=results or (), template=template, output=output)
        if diff is not None:
            out.print(diff, highlight=False, markup=False, soft_wrap=True)
            console.print("the card is stale: run `hubmerge card` without --check to update it")
            raise typer.Exit(1)
        out.print("the card is up to date")
        return
    path = write_card(model_dir, results=results or (), template=template, output=output)
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
    batch_size: Annotated[str, typer.Option(help="Batch size, or auto.")] = "8",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
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
    """Run lm-evaluation-harness on MODEL_DIR and write lm-eval's results JSON for the card."""
    from hubmerge.evals import resolve_tasks, run_eval

    path = run_eval(
        model_dir,
        resolve_tasks(tasks or (), preset),
        output=output,
        limit=limit,
        batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
        device=device,
        include_path=include_path or (),
        apply_chat_template=chat_template,
    )
    out.print(f"wrote {path}")


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
            log=_log,
        )
    out.print(f"published {result.url}" if result.url else f"wrote {result.out_dir}")


def _log(message: str) -> None:
    """One line of progress on stderr (hubmerge's messages quote paths, never markup)."""
    console.print(escape(message), highlight=False, soft_wrap=True)


def print_published(result: Any) -> None:
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
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Where the merged model goes.")] = Path(
        "demo-out"
    ),
    force: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Merge the shipped zoo with OLM (offline, CPU) and compare every model on held-out data."""
    from hubmerge.demo import run_demo

    with Display(console) as display:
        result = run_demo(out_dir, force=force, reporter=display)
    print_plan(result.merge.plan)
    table = Table(title="held-out exact-match accuracy")
    tasks = list(next(iter(result.accuracy.values())))
    for column in ("model", *tasks, "composite"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, scores in result.accuracy.items():
        composite = sum(scores.values()) / len(scores)
        cells = [f"{scores[t]:.3f}" for t in tasks] + [f"{composite:.3f}"]
        table.add_row(label, *cells, style="bold" if label == "merged" else None)
    out.print(table)
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
