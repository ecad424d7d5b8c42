"""Everything a card is rendered from, read from the merged model's folder and nothing else.

A card must say nothing about the machine it was made on, so every name that comes from the
user's files goes through `folder.PublicNames`: a model reference becomes its donor's name (Hub
id, or local folder name), and any other string that is a path outside the folder (absolute,
`~`, or climbing out with `..`) is cut to its last component. The methods' reports are read by
their card sections (`Method.card`), not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmerge import arch
from hubmerge.config import MergeConfig, parse_config
from hubmerge.errors import CardError, HubmergeError
from hubmerge.folder import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    Donor,
    PublicNames,
    read_json,
    read_plan,
    read_sources,
    read_yaml,
)
from hubmerge.plan import MergePlan
from hubmerge.recipe import read_recipe


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer in `folder` carries a chat template (in its config or beside it)."""
    if any((folder / name).exists() for name in arch.CHAT_TEMPLATE_FILES):
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


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

    @property
    def names(self) -> PublicNames:
        return PublicNames(self.donors)


def read_facts(folder: Path, name: str | None = None) -> ModelFacts:
    """Parse a `hubmerge merge` output folder; a missing required file is a `CardError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CardError(f"{folder}: no such model folder")
    plan = read_plan(folder)
    config_data = read_yaml(folder, CONFIG_FILE) or {}
    try:
        config = parse_config(config_data, CONFIG_FILE) if config_data else None
    except HubmergeError as e:
        raise CardError(f"{folder.name}/{e}") from None
    return ModelFacts(
        folder=folder,
        name=name or folder.resolve().name,
        plan=plan,
        config=config,
        config_data=config_data,
        recipe=read_recipe(folder),
        donors=read_sources(folder),
        model_config=read_json(folder, MODEL_CONFIG_FILE, required=True),
        chat_template=has_chat_template(folder),
    )
