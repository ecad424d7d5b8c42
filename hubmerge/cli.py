"""The `hubmerge` command: a thin typer shell over the Python API.

Every `HubmergeError` becomes one line on stderr and exit code 2. Heavy libraries (torch,
transformers) are imported inside the commands that need them, so `hubmerge merge` starts fast.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from hubmerge.errors import HubmergeError

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
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
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
    device: Annotated[str, typer.Option(help="Where NER/OLM compute (cpu, cuda).")] = "cpu",
    force: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Load .bin checkpoints (weights_only).")
    ] = False,
) -> None:
    """Build a model from other models' layers, as CONFIG describes, into OUT_DIR."""
    from hubmerge.merge import RECIPE_FILE
    from hubmerge.merge import merge as run_merge
    from hubmerge.writer import parse_size

    shard_size = parse_size(out_shard_size)
    with _ProgressBar() as bar:
        result = run_merge(
            config,
            out_dir,
            dry_run=dry_run,
            dtype=dtype.value if dtype else None,
            shard_size=shard_size,
            force=force,
            allow_pickle=allow_pickle,
            device=device,
            progress=None if dry_run else bar,
        )
    print_plan(result.plan)
    if result.out_dir is not None:
        out.print(f"wrote {result.out_dir} (recipe: {RECIPE_FILE})")


class _ProgressBar:
    """A rich progress bar over bytes and tensors, shown only while something is written."""

    def __enter__(self) -> _ProgressBar:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("writing"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task: Any = None
        return self

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(
            "merge", total=total_bytes, done=0, count=total_tensors
        )

    def advance(self, nbytes: int) -> None:
        done = self._progress.tasks[0].fields["done"] + 1
        self._progress.update(self._task, advance=nbytes, done=done)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


def main() -> None:
    """Console-script entry point."""
    app()
