"""What a shared Space accepts, and what it gives each job.

A Space is shared when strangers use the process: on Hugging Face Spaces (`SYSTEM=spaces`), or
with `HUBMERGE_SPACE=1`. It then reads models and datasets from the Hub only, so nobody makes the
server read its own files, and it sends no token the visitor did not give. Off a shared Space
(self-hosted) local folders are fine. Every job, shared or not, runs within the budgets below.
"""

from __future__ import annotations

import os
import re
import threading

from huggingface_hub import constants

from hubmerge.config import MergeConfig, MergekitConfig, OlmConfig, loads_config
from hubmerge.datasets import is_hub_dataset
from hubmerge.errors import ConfigError
from hubmerge.methods import mergekit_run
from hubmerge.sources import is_hub_id

#: Set to 1 to run as a shared Space away from Hugging Face (Spaces set `SYSTEM=spaces`).
SPACE_ENV = "HUBMERGE_SPACE"
#: A model name becomes a folder and a repo name: no slashes, no leading dot.
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
#: A merge's budget: wall seconds (downloads included) and memory beyond the server's own.
JOB_SECONDS = int(os.environ.get("HUBMERGE_JOB_SECONDS", 3 * 3600))
JOB_MEMORY = int(os.environ.get("HUBMERGE_JOB_MEMORY", 8 * 2**30))
#: A validation's budget: it reads configs only.
CHECK_SECONDS = int(os.environ.get("HUBMERGE_CHECK_SECONDS", 120))
CHECK_MEMORY = int(os.environ.get("HUBMERGE_CHECK_MEMORY", 2 * 2**30))
#: Merges running at once (the others wait their turn, checked already).
JOB_SLOTS = threading.BoundedSemaphore(int(os.environ.get("HUBMERGE_JOBS", "1")))


def shared_space() -> bool:
    """Whether strangers use this process: on Hugging Face Spaces, or with HUBMERGE_SPACE=1."""
    return os.environ.get("SYSTEM") == "spaces" or os.environ.get(SPACE_ENV) == "1"


def refuse_implicit_token() -> None:
    """Send no token the caller did not give: the Space owner's `HF_TOKEN` or login must never
    let a visitor read the owner's private or gated models, or publish as the owner.

    Process-wide (huggingface_hub reads the flag on every request); publishing passes the
    visitor's token explicitly, which this does not affect.
    """
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True


def read_config_text(text: str) -> MergeConfig:
    """The config in the editor, validated; on a shared Space also `check_shared`."""
    config = loads_config(text, "config")
    if isinstance(config, MergekitConfig):
        mergekit_run.validate(config, "config")
    if shared_space():
        check_shared(config)
    return config


def check_shared(config: MergeConfig) -> None:
    """Refuse whatever would make a shared Space read its own files: every model must be a Hub
    id, every OLM dataset a file in a Hub dataset repo, and a card template cannot be a path on
    the server.
    """
    for ref in config.referenced_models():
        if not is_hub_id(ref):
            raise ConfigError(
                f"{ref}: not a Hub id; this shared Space only reads models from the Hub "
                "(ORG/NAME or ORG/NAME@REVISION), never files on the server"
            )
    if isinstance(config, OlmConfig):
        for name in config.dataset:
            if not is_hub_dataset(name):
                raise ConfigError(
                    f"dataset {name}: not a file in a Hub dataset repo; this shared Space reads "
                    "datasets from the Hub only (hf://datasets/ORG/NAME/FILE.json), never files "
                    "on the server"
                )
    if config.card and config.card.template:
        raise ConfigError(
            "card.template: a path on the server; this shared Space uses the default card"
        )
    if isinstance(config, MergekitConfig) and "tokenizer" in config.mergekit_data():
        # mergekit reads the models a `tokenizer:` section names itself, local paths included.
        raise ConfigError(
            "tokenizer: mergekit would read the models it names itself, which this shared Space "
            "does not allow; use tokenizer_source: ORG/NAME"
        )


def check_name(name: str) -> str:
    """The output model's name, which becomes its folder and the title of its card."""
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(
            f"model name {name!r}: use letters, digits, '-', '_' and '.' (at most 96), "
            "starting with a letter or digit"
        )
    return name
