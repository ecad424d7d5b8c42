"""What a merge method is: the one shape every entry of the registry (`hubmerge.methods`) has.

A method plans, it does not write: `Method.plan` returns the `MergePlan` and the reports the
method wants beside the model (`Planned`); `merge.merge` writes the weights with the one writer
and the reports through `folder.write_report`, so a dry run simply writes nothing. The card
renderer fills the template's `card_key` with `card(inputs)`, read from the folder's typed
reports; `images` draws pictures (from those reports) when the card is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hubmerge.folder import PublicNames, Report
from hubmerge.plan import MergePlan
from hubmerge.sources import ModelSource


class Reporter(Protocol):
    """How long-running methods show progress: bars with ETA and one-line log messages."""

    def progress(self, description: str, total: int) -> Callable[[], None]:
        """Start a bar of `total` steps; returns the function that advances it by one."""
        ...

    def log(self, message: str) -> None: ...


@dataclass(frozen=True)
class Context:
    """What a method may need beyond its config and sources: where to compute, where to keep
    state, how to report progress."""

    #: `--device`; None lets the method decide (its config's `device`, else the CPU).
    device: str | None = None
    #: A hidden sibling folder for state that must survive a failed run (OLM's report), removed
    #: once the output is complete; None on a dry run.
    work_dir: Path | None = None
    #: Discard saved state instead of resuming from it.
    restart: bool = False
    reporter: Reporter | None = None


@dataclass(frozen=True)
class Planned:
    """A method's result: the plan, the reports to write beside the model, and the recipe when
    the method computed it already (NER's report holds it)."""

    plan: MergePlan
    reports: tuple[Report, ...] = ()
    recipe: dict[str, Any] | None = None


@dataclass(frozen=True)
class CardInputs:
    """What a method's card section reads: the model folder (its reports), the names fit to
    publish, and the config as written (`hubmerge_config.yml`)."""

    folder: Path
    names: PublicNames
    config_data: Mapping[str, Any]


Sources = Mapping[str, ModelSource]
#: A plan from the config and the sources alone: pure, and cheap on headers (the Space's preview).
PreviewPlanner = Callable[[Any, Sources], MergePlan]
Planner = Callable[[Any, Sources, Context], Planned]


@dataclass(frozen=True)
class Method:
    """One merge method, as the registry lists it."""

    name: str
    #: Its pydantic config model (validated by `config.parse_config`).
    config: type[Any]
    #: The planner; a method without one plans with `preview` and writes no reports.
    planner: Planner | None = None
    preview: PreviewPlanner | None = None
    #: The card template's variable for this method's section, and what fills it (None when the
    #: folder has nothing of this method's).
    card_key: str | None = None
    card: Callable[[CardInputs], dict[str, Any] | None] | None = None
    #: Draws this method's images into a model folder (from its reports) with the card.
    images: Callable[[Path], None] | None = None
    #: The config checked before any model is opened (mergekit's own models).
    validate: Callable[[Any, str], None] | None = None
    #: The recipe, when it is not the plan's (`recipe.plan_recipe`).
    recipe: Callable[[Any, Sources], dict[str, Any]] | None = None
    #: Writes the weights, when the one writer does not (mergekit computes them); returns the
    #: reports to write beside them.
    write: Callable[..., Sequence[Report]] | None = None

    def plan(self, config: Any, sources: Sources, context: Context) -> Planned:
        if self.planner is not None:
            return self.planner(config, sources, context)
        assert self.preview is not None, f"{self.name}: a method needs a planner or a preview"
        return Planned(self.preview(config, sources))
