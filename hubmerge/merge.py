"""The Python API behind `hubmerge merge`: config -> sources -> plan -> one streamed output.

Everything that can be checked is checked before the output folder is created: the config,
every source's files and headers, architecture and shape compatibility, and the plan itself.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hubmerge import arch
from hubmerge.config import (
    BlockExpansionConfig,
    LinearConfig,
    MergeConfig,
    MergekitConfig,
    NerConfig,
    OlmConfig,
    PassthroughConfig,
    load_config,
)
from hubmerge.devices import check_device
from hubmerge.errors import CardError, SourceError
from hubmerge.methods import block_expansion, linear, mergekit_run, ner, olm, passthrough
from hubmerge.plan import MergePlan, recipe_yaml
from hubmerge.sources import ModelSource
from hubmerge.writer import Progress, staged_output, write_model

RECIPE_FILE = "mergekit_config.yml"
CONFIG_FILE = "hubmerge_config.yml"
PLAN_FILE = "hubmerge_plan.json"


@dataclass(frozen=True)
class MergeContext:
    """What a method may need beyond its config: where reports go and where to compute."""

    out_dir: Path
    #: The staging folder that becomes `out_dir`; None on a dry run (write nothing).
    staging: Path | None
    #: `--device`; None lets the method decide (its config's `device`, else the CPU).
    device: str | None = None
    #: A hidden sibling folder for state that must survive a failed run (OLM's report), removed
    #: once the output is complete; None on a dry run.
    work_dir: Path | None = None
    #: Discard saved state instead of resuming from it.
    restart: bool = False
    reporter: Reporter | None = None


class Reporter(Protocol):
    """How long-running methods show progress: bars with ETA and one-line log messages."""

    def progress(self, description: str, total: int) -> Callable[[], None]:
        """Start a bar of `total` steps; returns the function that advances it by one."""
        ...

    def log(self, message: str) -> None: ...


Planner = Callable[[Any, Mapping[str, ModelSource], MergeContext], MergePlan]
PLANNERS: dict[type, Planner] = {
    PassthroughConfig: lambda c, s, _: passthrough.plan(c, s),
    BlockExpansionConfig: lambda c, s, _: block_expansion.plan(c, s),
    OlmConfig: olm.plan,
    NerConfig: ner.plan,
    LinearConfig: lambda c, s, _: linear.plan(c, s),
    # mergekit computes the tensors; its plan is the merge's lineage and depth.
    MergekitConfig: lambda c, s, _: mergekit_run.plan(c, s),
}


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


def write_config(config: MergeConfig, folder: Path) -> None:
    """Write `CONFIG_FILE`, the config as given (the card reads its `hub:` and `card:` from it)."""
    (folder / CONFIG_FILE).write_text(config_yaml(config))


def config_yaml(config: MergeConfig) -> str:
    """The text of `CONFIG_FILE` for `config`, so a copy on disk can be compared with it."""
    return recipe_yaml(config.model_dump(mode="json", exclude_none=True))


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
    if isinstance(config, MergekitConfig):
        mergekit_run.validate(config, where)
    if dtype is not None:
        config = config.model_copy(update={"out_dtype": dtype})
    check_options(config, device=device, card=card)
    sources = open_sources(config.referenced_models(), allow_pickle=allow_pickle)
    planner = PLANNERS[type(config)]
    if dry_run:
        plan = planner(config, sources, MergeContext(out_dir, None, device, reporter=reporter))
        return MergeResult(plan, _recipe(config, plan, sources), None, config)
    out_dir = Path(out_dir).absolute()
    work = work_dir(out_dir)
    with staged_output(out_dir, force=force) as staging:
        context = MergeContext(out_dir, staging, device, work, restart, reporter)
        plan = planner(config, sources, context)
        recipe = _recipe(config, plan, sources)
        if isinstance(config, MergekitConfig):
            if reporter:
                reporter.log(f"mergekit computes the {config.merge_method} merge")
            mergekit_run.write(
                config,
                plan,
                sources,
                staging,
                shard_size=shard_size,
                device=device,
                allow_pickle=allow_pickle,
            )
        else:
            write_model(plan, sources, staging, shard_size=shard_size, progress=progress)
        (staging / RECIPE_FILE).write_text(recipe_yaml(recipe))
        (staging / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        write_config(config, staging)
        # Imported here: hubmerge.card reads the file names this module defines.
        from hubmerge.card import SOURCES_FILE, sources_json, write_card

        # Written even without a card, so that `hubmerge card` can render one later.
        (staging / SOURCES_FILE).write_text(sources_json(sources))
        if card:
            write_card(staging, name=out_dir.name)
    shutil.rmtree(work, ignore_errors=True)
    return MergeResult(plan, recipe, out_dir, config)


def _recipe(
    config: MergeConfig, plan: MergePlan, sources: Mapping[str, ModelSource]
) -> dict[str, Any]:
    """The recipe that rebuilds the model: the plan's, or for mergekit's methods the config."""
    if isinstance(config, MergekitConfig):
        return mergekit_run.recipe(config, sources)
    return plan.to_recipe(sources)
