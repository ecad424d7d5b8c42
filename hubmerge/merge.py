"""The Python API behind `hubmerge merge`: config -> sources -> plan -> one streamed output.

Everything that can be checked is checked before the output folder is created: the config,
every source's files and headers, architecture and shape compatibility, and the plan itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmerge import arch, methods
from hubmerge.card import write_card
from hubmerge.card.donors import describe_sources
from hubmerge.config import MergeConfig, load_config
from hubmerge.devices import check_device
from hubmerge.errors import CardError, SourceError
from hubmerge.folder import (
    SOURCES_FILE,
    sources_json,
    write_config,
    write_plan,
    write_report,
)
from hubmerge.methods.base import Context, Method, Planned, Reporter
from hubmerge.plan import MergePlan
from hubmerge.recipe import plan_recipe, write_recipe
from hubmerge.sources import ModelSource
from hubmerge.writer import Progress, staged_output, write_model


@dataclass
class MergeResult:
    plan: MergePlan
    recipe: dict[str, Any]
    out_dir: Path | None
    #: The config as merged (after `--dtype`), for callers that show more than the plan.
    config: MergeConfig | None = None


def open_sources(refs: list[str], *, allow_pickle: bool = False) -> dict[str, ModelSource]:
    """Open every model and check that their layers can be stacked together."""
    sources = {ref: ModelSource.open(ref, allow_pickle=allow_pickle) for ref in refs}
    check_compatible(sources)
    return sources


def check_compatible(sources: Mapping[str, ModelSource]) -> None:
    """Refuse models whose layers cannot be stacked: another architecture or other shapes."""
    first = next(iter(sources.values()))
    for ref, source in sources.items():
        if arch.architecture(source.config, ref) != arch.architecture(first.config, first.ref):
            raise SourceError(
                f"{ref}: architecture {source.config['architectures'][0]} differs "
                f"from {first.ref}'s {first.config['architectures'][0]}"
            )
        for key in arch.SHAPE_FIELDS:
            if source.config.get(key) != first.config.get(key):
                raise SourceError(
                    f"{ref}: {key} {source.config.get(key)} differs from "
                    f"{first.ref}'s {first.config.get(key)}"
                )
        source.layers  # noqa: B018 - validates the layer tensors before anything is written


def work_dir(out_dir: Path) -> Path:
    """Where a merge into `out_dir` keeps state that survives a failed or interrupted run."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.work"


def check_options(config: MergeConfig, *, device: str | None, card: bool) -> None:
    """What fails without any model: the device and the card template, checked before the
    models are opened and long before the weights are written.
    """
    configured = getattr(config, "device", None)
    if device is not None:
        check_device(device)
    elif configured is not None:
        check_device(configured, key="device:")
    for index, worker in enumerate(getattr(config, "devices", None) or []):
        check_device(worker, allow_auto=False, key=f"devices[{index}]:")
    template = config.card.template if card and config.card else None
    if template:
        try:
            Path(template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise CardError(
                f"card.template: {template}: cannot read card template ({why})"
            ) from None


def merge(
    config: MergeConfig | Path,
    out_dir: Path,
    *,
    dry_run: bool = False,
    dtype: str | None = None,
    shard_size: int = 5 * 10**9,
    force: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    restart: bool = False,
    progress: Progress | None = None,
    reporter: Reporter | None = None,
    card: bool = True,
) -> MergeResult:
    """Build the model `config` describes into `out_dir`, or only plan it with `dry_run`.

    `card` writes the model card (README.md and layer_map.svg) once the weights are written.
    """
    where = str(config) if isinstance(config, Path) else "config"
    if isinstance(config, Path):
        config = load_config(config)
    method = methods.for_config(config)
    if method.validate is not None:
        method.validate(config, where)
    if dtype is not None:
        config = config.model_copy(update={"out_dtype": dtype})
    check_options(config, device=device, card=card)
    sources = open_sources(config.referenced_models(), allow_pickle=allow_pickle)
    if dry_run:
        planned = method.plan(config, sources, Context(device, reporter=reporter))
        return MergeResult(planned.plan, _recipe(method, config, planned, sources), None, config)
    out_dir = Path(out_dir).absolute()
    work = work_dir(out_dir)
    with staged_output(out_dir, force=force) as staging:
        planned = method.plan(config, sources, Context(device, work, restart, reporter))
        plan = planned.plan
        recipe = _recipe(method, config, planned, sources)
        reports = list(planned.reports)
        if method.write is not None:
            reports += method.write(
                config,
                plan,
                sources,
                staging,
                shard_size=shard_size,
                device=device,
                allow_pickle=allow_pickle,
                reporter=reporter,
            )
        else:
            write_model(plan, sources, staging, shard_size=shard_size, progress=progress)
        for report in reports:
            write_report(report, staging)
        write_recipe(recipe, staging)
        write_plan(plan, staging)
        write_config(config, staging)
        # Written even without a card, so that `hubmerge card` can render one later.
        (staging / SOURCES_FILE).write_text(sources_json(describe_sources(sources)))
        if card:
            write_card(staging, name=out_dir.name)
    shutil.rmtree(work, ignore_errors=True)
    return MergeResult(plan, recipe, out_dir, config)


def _recipe(
    method: Method,
    config: MergeConfig,
    planned: Planned,
    sources: Mapping[str, ModelSource],
) -> dict[str, Any]:
    """The recipe that rebuilds the model: the method's own (mergekit's methods: the config),
    else the plan's, computed once."""
    if method.recipe is not None:
        return method.recipe(config, sources)
    return planned.recipe if planned.recipe is not None else plan_recipe(planned.plan, sources)
