"""The output folder of a merge: its file names, its typed records, and how they are written.

A `hubmerge merge` output is the real interface between the merge, the card, publishing and CI:
the merge writes it, `hubmerge card` and `hubmerge publish` read it (in CI from a git checkout
without weights). Every file name is spelled here once; the plan, the sources record and the
methods' reports are typed dataclasses with `to_json`/`from_json`, so their layout is spelled
once for the writer, the card and the tests. Files written outside a staging folder go through
`atomic_write`, one temp-name convention. `PublicNames` is the one rule that turns a local path
or model reference into the name a card or the Hub may show.

Nothing here imports the merge engine (writer, methods, torch): publishing and cards stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar, Protocol, TypeVar

import yaml

from hubmerge.config import MergeConfig
from hubmerge.errors import CardError
from hubmerge.plan import MergePlan

#: The model card, and the images it shows.
CARD_FILE = "README.md"
LAYER_MAP_FILE = "layer_map.svg"
NER_HEATMAP_FILE = "ner_heatmap.png"
#: The card and its images: what `hubmerge publish --card-only` uploads.
CARD_FILES = (CARD_FILE, LAYER_MAP_FILE, NER_HEATMAP_FILE)
#: The weights' config (the donor's, with the merged depth) and the shard index.
MODEL_CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
#: The mergekit config that rebuilds the model.
RECIPE_FILE = "mergekit_config.yml"
#: The config as merged (the card reads its `hub:` and `card:` from it).
CONFIG_FILE = "hubmerge_config.yml"
#: The plan (`MergePlan.to_dict`): what the card and the Space read.
PLAN_FILE = "hubmerge_plan.json"
#: What the card says about each source (`Donor`), recorded while the sources were open.
SOURCES_FILE = "hubmerge_sources.json"
#: The methods' reports (`OlmReport`, `NerReport`, `MergekitReport`).
OLM_REPORT_FILE = "merge_report.json"
NER_REPORT_FILE = "ner_report.json"
MERGEKIT_REPORT_FILE = "hubmerge_mergekit.json"
#: `hubmerge run`'s state (local only: `.hubmerge*` is never uploaded).
RUN_STATE_FILE = ".hubmerge_run.json"
#: Where `hubmerge run`'s eval stage writes lm-eval's results (published with the model).
EVAL_RESULTS_FILE = "eval_results.json"
#: lm-eval results placed beside a model for its card (`results/*.json`, as CI folders hold them).
RESULTS_DIR = "results"


# -- writing ----------------------------------------------------------------------------------


def partial_name(name: str, pid: int) -> str:
    """The hidden sibling a file or folder `name` is written as before it is renamed into
    place: `.NAME.partial-PID` (the staging folder of a merge is named so too). A hidden name
    keeps its one dot, so `.hubmerge*` (never uploaded) still covers it."""
    return f".{name.removeprefix('.')}.partial-{pid}"


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `path` so that a crash or a concurrent reader sees the old file or the new, never
    half: written to `partial_name` beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(partial_name(path.name, os.getpid()))
    try:
        if isinstance(data, str):
            partial.write_text(data, encoding="utf-8")
        else:
            partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def json_text(data: Any) -> str:
    """The JSON layout of every JSON file hubmerge writes."""
    return json.dumps(data, indent=2) + "\n"


def yaml_text(data: Any) -> str:
    """The YAML layout of every YAML file hubmerge writes (recipes and configs)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def config_yaml(config: MergeConfig) -> str:
    """The text of `CONFIG_FILE` for `config`, so a copy on disk can be compared with it."""
    return yaml_text(config.model_dump(mode="json", exclude_none=True))


def write_config(config: MergeConfig, folder: Path) -> None:
    """Write `CONFIG_FILE`, the config as given (the card reads its `hub:` and `card:` from it)."""
    (Path(folder) / CONFIG_FILE).write_text(config_yaml(config))


def merge_fingerprint(config: MergeConfig) -> str:
    """What the merged weights depend on: the config without its `hub:` and `card:` sections."""
    relevant = config.model_dump(mode="json", exclude={"hub", "card"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def results_files(folder: Path) -> list[Path]:
    """The lm-eval results the folder's card shows: `results/*.json`, by name."""
    return sorted((Path(folder) / RESULTS_DIR).glob("*.json"))


def write_plan(plan: MergePlan, folder: Path) -> None:
    (Path(folder) / PLAN_FILE).write_text(json_text(plan.to_dict()))


def read_plan(folder: Path) -> MergePlan:
    """The folder's plan; a missing or malformed one is a `CardError`."""
    data = read_json(folder, PLAN_FILE, required=True)
    try:
        return MergePlan.from_dict(data)
    except (KeyError, TypeError) as e:
        raise CardError(f"{folder.name}/{PLAN_FILE}: not a hubmerge plan (missing {e})") from None


def read_json(folder: Path, name: str, *, required: bool = False) -> Any:
    """The JSON file `name` of `folder`; None when absent (a `CardError` when `required`)."""
    path = Path(folder) / name
    if not path.is_file():
        if required:
            raise CardError(f"{folder.name}: no {name} (is it a `hubmerge merge` output?)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CardError(f"{folder.name}/{name}: unreadable ({e})") from None


def read_yaml(folder: Path, name: str) -> Any:
    """The YAML file `name` of `folder`; None when absent."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CardError(f"{folder.name}/{name}: unreadable ({str(e).splitlines()[0]})") from None


# -- the sources record -----------------------------------------------------------------------


@dataclass(frozen=True)
class Donor:
    """One source model as the card presents it (an entry of `SOURCES_FILE`)."""

    name: str
    hub: bool
    #: The Hub commit that was read (a snapshot's folder name); None for a local folder.
    revision: str | None
    license: str | None
    language: tuple[str, ...]
    #: What the donor's own card lists as `base_model`: how far back the lineage goes.
    base_model: tuple[str, ...]

    @property
    def url(self) -> str | None:
        return f"https://huggingface.co/{self.name}" if self.hub else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Donor:
        return cls(
            name=data["name"],
            hub=data["hub"],
            revision=data["revision"],
            license=data["license"],
            language=tuple(data["language"]),
            base_model=tuple(data["base_model"]),
        )


def sources_json(donors: Mapping[str, Donor]) -> str:
    """The contents of `SOURCES_FILE`: each source's `Donor`, keyed by its reference."""
    return json_text({ref: donor.to_json() for ref, donor in donors.items()})


def read_sources(folder: Path) -> dict[str, Donor]:
    """The donors recorded in `folder`, keyed by the references the plan uses."""
    path = Path(folder) / SOURCES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {ref: Donor.from_json(d) for ref, d in data.items()}
    except FileNotFoundError:
        raise CardError(
            f"{folder.name}: no {SOURCES_FILE} (not written by `hubmerge merge`, or by an "
            "older version: merge again)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CardError(f"{folder.name}/{SOURCES_FILE}: unreadable ({e})") from None


# -- publishable names ------------------------------------------------------------------------


class PublicNames:
    """The one rule that turns the user's references and paths into names fit to publish.

    A model reference becomes its donor's name (a Hub id, or a local folder's name); any other
    path that leaves the folder (absolute, `~`, or climbing out with `..`) is cut to its last
    component. `public` applies it to YAML/JSON data (the card); `text` to the text of a file
    (publishing), where a local donor's reference, the folder's own path and the home folder
    are replaced wherever they occur. The donors' names themselves are decided once, while the
    merge has the sources open (`sources.public_name`), and recorded in `SOURCES_FILE`.
    """

    def __init__(self, donors: Mapping[str, Donor], folder: Path | None = None) -> None:
        self.donors = donors
        self.folder = folder
        self._pattern: re.Pattern[str] | None = None
        self._renames: dict[str, str] = {}

    @classmethod
    def of(cls, folder: Path) -> PublicNames:
        """The names of `folder`'s sources (none when it has no sources record)."""
        try:
            donors = read_sources(folder)
        except CardError:  # not written by `hubmerge merge`: nothing to translate
            donors = {}
        return cls(donors, Path(folder))

    def model(self, ref: str) -> str:
        donor = self.donors.get(ref)
        return donor.name if donor else self.path(ref)

    @staticmethod
    def path(text: str) -> str:
        """A path leaving the folder (absolute, home-relative, or with `..`) -> its last part."""
        if text.startswith(("/", "~", "\\")) or PurePath(text).is_absolute() or ".." in text:
            return PurePath(text.replace("\\", "/")).name or text
        return text

    def public(self, value: Any) -> Any:
        """`value` (YAML/JSON data) with every model reference and outside path renamed."""
        if isinstance(value, str):
            return self.model(value) if value in self.donors else self.path(value)
        if isinstance(value, dict):
            return {self.public(k): self.public(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.public(v) for v in value]
        return value

    def text(self, text: str) -> str:
        """`text` with every local donor's reference, the folder's path and the home folder
        (which can hold a user name) replaced: by the donor's name, the folder's name, `~/`."""
        if self._pattern is None:
            renames = {ref: d.name for ref, d in self.donors.items() if not d.hub and ref != d.name}
            if self.folder is not None:
                for path in {self.folder.absolute(), self.folder.resolve()}:
                    renames.setdefault(str(path), self.folder.name)
            home = str(Path.home())
            if len(home) > 1:
                renames.setdefault(home + os.sep, "~" + os.sep)
            # Longest first, since a path may contain another; a name, never the start of a
            # longer one.
            self._renames = renames
            self._pattern = re.compile(
                "|".join(
                    re.escape(ref) + ("" if ref.endswith(("/", "\\")) else r"(?![\w.-])")
                    for ref in sorted(renames, key=len, reverse=True)
                )
            )
        if not self._renames:
            return text
        return self._pattern.sub(lambda match: self._renames[match.group(0)], text)


# -- reports ----------------------------------------------------------------------------------


class Report(Protocol):
    """A method's report: one file of the output folder, written by the merge, read by the card."""

    FILE: ClassVar[str]

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", "OlmReport", "NerReport", "MergekitReport")


def write_report(report: Report, folder: Path) -> None:
    atomic_write(Path(folder) / report.FILE, json_text(report.to_json()))


def read_report(folder: Path, kind: type[R]) -> R | None:
    """The folder's report of `kind`; None when there is none, a `CardError` when malformed."""
    data = read_json(folder, kind.FILE)
    if data is None:
        return None
    try:
        return kind.from_json(data)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CardError(f"{kind.FILE}: not {kind.KIND} report hubmerge can read ({e!r})") from None


#: Scores as OLM records them: dataset -> {"score", "tiebreak", and "misses" or "per_sample"}.
DatasetScores = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class OlmSelection:
    """How OLM chose its starting model: every starter's scores and merit."""

    scores: dict[str, DatasetScores]
    merit: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.scores, "merit": self.merit}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OlmSelection:
        return cls(dict(data["scores"]), dict(data["merit"]))


@dataclass(frozen=True)
class OlmPosition:
    """One decided position: every candidate's scores, the proposal, the test, the winner."""

    layer: int
    #: `attention` or `mlp` with `granularity: module`; None for a whole layer.
    part: str | None
    candidates: list[str]
    current: str
    scores: dict[str, DatasetScores]
    #: dataset -> candidate -> score: the public implementation's layout.
    metrics: dict[str, dict[str, float]]
    merit: dict[str, float]
    best_model: str
    proposed: str | None = None
    acceptance: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layer": self.layer}
        if self.part is not None:
            data["part"] = self.part
        return data | {
            "candidates": self.candidates,
            "current": self.current,
            "scores": self.scores,
            "metrics": self.metrics,
            "merit": self.merit,
            "proposed": self.proposed,
            "acceptance": self.acceptance,
            "best_model": self.best_model,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OlmPosition:
        return cls(
            layer=data["layer"],
            part=data.get("part"),
            candidates=list(data["candidates"]),
            current=data["current"],
            scores=dict(data["scores"]),
            metrics=dict(data["metrics"]),
            merit=dict(data["merit"]),
            best_model=data["best_model"],
            proposed=data.get("proposed"),
            acceptance=data.get("acceptance"),
            seconds=data.get("seconds", 0.0),
        )


@dataclass(frozen=True)
class OlmHeldout:
    """`hubmerge demo`'s comparison on held-out data: accuracy per model and task."""

    metric: str
    #: task -> the held-out file's name.
    datasets: dict[str, str]
    #: model label -> task -> accuracy.
    accuracy: dict[str, dict[str, float]]
    merged: str
    best_donor: str
    margin: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OlmHeldout:
        return cls(
            data["metric"],
            dict(data["datasets"]),
            dict(data["accuracy"]),
            data["merged"],
            data["best_donor"],
            data["margin"],
        )


@dataclass
class OlmReport:
    """`merge_report.json`: OLM's record of every score (see `methods/olm/report.py`). Not
    frozen: it is also the search's resume state, filled in position by position."""

    FILE: ClassVar[str] = OLM_REPORT_FILE
    KIND: ClassVar[str] = "an OLM"

    version: int
    fingerprint: str
    direction: str
    aggregate: str
    #: dataset -> mode (`exact` or `quality`).
    datasets: dict[str, str]
    base_model: str | None
    base_selection: OlmSelection | None
    base_scores: DatasetScores | None
    layers: list[OlmPosition]
    complete: bool
    #: The evaluation counters of the finished search.
    evaluation: dict[str, Any] | None = None
    heldout: OlmHeldout | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "direction": self.direction,
            "aggregate": self.aggregate,
            "datasets": self.datasets,
            "base_model": self.base_model,
            "base_selection": self.base_selection.to_json() if self.base_selection else None,
            "base_scores": self.base_scores,
            "layers": [position.to_json() for position in self.layers],
            "complete": self.complete,
        }
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation
        if self.heldout is not None:
            data["heldout"] = self.heldout.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OlmReport:
        selection = data.get("base_selection")
        heldout = data.get("heldout")
        return cls(
            version=data["version"],
            fingerprint=data["fingerprint"],
            direction=data["direction"],
            aggregate=data["aggregate"],
            datasets=dict(data["datasets"]),
            base_model=data["base_model"],
            base_selection=OlmSelection.from_json(selection) if selection else None,
            base_scores=data.get("base_scores"),
            layers=[OlmPosition.from_json(record) for record in data["layers"]],
            complete=data["complete"],
            evaluation=data.get("evaluation"),
            heldout=OlmHeldout.from_json(heldout) if heldout else None,
        )


@dataclass(frozen=True)
class NerModelScores:
    """One model's NER at one layer: the mean over its matrices, and each matrix's."""

    mean: float
    matrices: dict[str, float]


@dataclass(frozen=True)
class NerLayer:
    """One layer's NER decision: every model's scores and the chosen model (and, in module
    granularity, the model each tensor comes from)."""

    layer: int
    chosen: str
    scores: dict[str, NerModelScores]
    modules: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "layer": self.layer,
            "chosen": self.chosen,
            "scores": {m: asdict(s) for m, s in self.scores.items()},
        }
        if self.modules is not None:
            data["modules"] = self.modules
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NerLayer:
        return cls(
            layer=data["layer"],
            chosen=data["chosen"],
            scores={
                m: NerModelScores(s["mean"], dict(s["matrices"])) for m, s in data["scores"].items()
            },
            modules=data.get("modules"),
        )


@dataclass(frozen=True)
class NerEdge:
    """Where the embeddings (or the head) come from: chosen by NER (with the scores) or the base."""

    chosen: str
    scores: dict[str, float] | None = None
    #: Tied embeddings: the head stays with the embeddings.
    tied: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"chosen": self.chosen}
        if self.scores is not None:
            data["scores"] = self.scores
        if self.tied:
            data["tied"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NerEdge:
        return cls(data["chosen"], data.get("scores"), bool(data.get("tied", False)))


@dataclass(frozen=True)
class NerReport:
    """`ner_report.json`: every NER score, every choice, and the recipe."""

    FILE: ClassVar[str] = NER_REPORT_FILE
    KIND: ClassVar[str] = "a NER"

    granularity: str
    normalize: str
    base_model: str
    models: list[str]
    layers: list[NerLayer]
    embed: NerEdge
    head: NerEdge
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "ner",
            "granularity": self.granularity,
            "normalize": self.normalize,
            "base_model": self.base_model,
            "models": self.models,
            "layers": [layer.to_json() for layer in self.layers],
            "embed": self.embed.to_json(),
            "head": self.head.to_json(),
            "recipe": self.recipe,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NerReport:
        return cls(
            granularity=data["granularity"],
            normalize=data["normalize"],
            base_model=data["base_model"],
            models=list(data["models"]),
            layers=[NerLayer.from_json(record) for record in data["layers"]],
            embed=NerEdge.from_json(data["embed"]),
            head=NerEdge.from_json(data["head"]),
            recipe=dict(data.get("recipe") or {}),
        )


@dataclass(frozen=True)
class MergekitReport:
    """`hubmerge_mergekit.json`: the method mergekit ran, from mergekit's registry."""

    FILE: ClassVar[str] = MERGEKIT_REPORT_FILE
    KIND: ClassVar[str] = "a mergekit"

    method: str
    name: str
    reference_url: str | None
    mergekit_version: str
    random_seed: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MergekitReport:
        return cls(
            method=str(data.get("method", data["name"])),
            name=str(data["name"]),
            reference_url=data["reference_url"],
            mergekit_version=str(data["mergekit_version"]),
            random_seed=data.get("random_seed"),
        )
