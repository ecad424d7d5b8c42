"""Everything a card is rendered from, read from the merged model's folder and nothing else.

A card must say nothing about the machine it was made on, so every name that comes from the
user's files goes through `Namer.public`: a model reference becomes its donor's name (Hub id, or
local folder name), and any other string that is a path outside the folder (absolute, `~`, or
climbing out with `..`) is cut to its last component.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml

from hubmerge.card.donors import Donor, load_donors
from hubmerge.config import MergeConfig, parse_config
from hubmerge.errors import CardError, HubmergeError
from hubmerge.merge import CONFIG_FILE, PLAN_FILE, RECIPE_FILE
from hubmerge.methods.mergekit_run import REPORT_FILE as MERGEKIT_REPORT_FILE
from hubmerge.methods.ner import HEATMAP_FILE as NER_HEATMAP_FILE
from hubmerge.methods.ner import REPORT_FILE as NER_REPORT_FILE
from hubmerge.methods.olm.report import REPORT_FILE as OLM_REPORT_FILE
from hubmerge.plan import MergePlan


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer in `folder` carries a chat template (in its config or beside it)."""
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


class Namer:
    """Turns the user's references and paths into names that are safe to publish."""

    def __init__(self, donors: Mapping[str, Donor]) -> None:
        self.donors = donors

    def model(self, ref: str) -> str:
        donor = self.donors.get(ref)
        return donor.name if donor else self.path(ref)

    @staticmethod
    def path(text: str) -> str:
        """A path leaving the folder (absolute, home-relative, or with `..`) -> its last part."""
        if text.startswith(("/", "~", "\\")) or PurePath(text).is_absolute() or ".." in text:
            return PurePath(text.replace("\\", "/")).name or text
        return text

    def plan(self, plan: MergePlan) -> MergePlan:
        """`plan` with every model reference renamed, so its rows print publishable names."""
        return plan.renamed(self.model)

    def public(self, value: Any) -> Any:
        """`value` (YAML/JSON data) with every model reference and outside path renamed."""
        if isinstance(value, str):
            return self.model(value) if value in self.donors else self.path(value)
        if isinstance(value, dict):
            return {self.public(k): self.public(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.public(v) for v in value]
        return value


@dataclass(frozen=True)
class ModelFacts:
    """The merged model folder, parsed."""

    folder: Path
    #: The model's name: the folder's, unless the merge was still in its staging folder.
    name: str
    plan: MergePlan
    config: MergeConfig | None
    #: `hubmerge_config.yml` as written (to show it as the user wrote it, defaults included).
    config_data: dict[str, Any]
    recipe: dict[str, Any]
    donors: dict[str, Donor]
    model_config: dict[str, Any]
    chat_template: bool
    olm_report: dict[str, Any] | None
    ner_report: dict[str, Any] | None
    ner_heatmap: bool
    #: mergekit's method (name, paper, version) when mergekit computed the weights.
    mergekit_report: dict[str, Any] | None = None

    @property
    def namer(self) -> Namer:
        return Namer(self.donors)


def read_facts(folder: Path, name: str | None = None) -> ModelFacts:
    """Parse a `hubmerge merge` output folder; a missing required file is a `CardError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CardError(f"{folder}: no such model folder")
    plan_data = _json(folder, PLAN_FILE, required=True)
    config_data = _yaml(folder, CONFIG_FILE) or {}
    try:
        config = parse_config(config_data, CONFIG_FILE) if config_data else None
    except HubmergeError as e:
        raise CardError(f"{folder.name}/{e}") from None
    return ModelFacts(
        folder=folder,
        name=name or folder.resolve().name,
        plan=_plan(plan_data, folder),
        config=config,
        config_data=config_data,
        recipe=_yaml(folder, RECIPE_FILE) or {},
        donors=load_donors(folder),
        model_config=_json(folder, "config.json", required=True),
        chat_template=has_chat_template(folder),
        olm_report=_json(folder, OLM_REPORT_FILE),
        ner_report=_json(folder, NER_REPORT_FILE),
        ner_heatmap=(folder / NER_HEATMAP_FILE).is_file(),
        mergekit_report=_json(folder, MERGEKIT_REPORT_FILE),
    )


def _plan(data: dict[str, Any], folder: Path) -> MergePlan:
    try:
        return MergePlan.from_dict(data)
    except (KeyError, TypeError) as e:
        raise CardError(f"{folder.name}/{PLAN_FILE}: not a hubmerge plan (missing {e})") from None


def _json(folder: Path, name: str, *, required: bool = False) -> Any:
    path = folder / name
    if not path.is_file():
        if required:
            raise CardError(f"{folder.name}: no {name} (is it a `hubmerge merge` output?)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CardError(f"{folder.name}/{name}: unreadable ({e})") from None


def _yaml(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CardError(f"{folder.name}/{name}: unreadable ({str(e).splitlines()[0]})") from None
