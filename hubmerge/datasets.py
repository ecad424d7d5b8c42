"""Evaluation datasets: conversation records turned into (prompt turns, reference answer) samples.

Layer-selection methods (OLM) and the zoo score a model by exact match on small conversation
datasets. Three common record layouts are accepted, so datasets exported from ShareGPT-style or
OpenAI-style tools work unchanged:

- `{"conversation": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`
- `{"conversations": [...]}` (the ShareGPT spelling, same turns)
- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`

An optional system turn may come first. The last assistant turn is the reference; every turn
before it is the prompt. Record indices in error messages count from 0, like the JSON list.

A dataset is a local JSON file, or a file in a Hub dataset repo named as huggingface_hub's file
system names it: `hf://datasets/ORG/NAME/PATH` (or `hf://datasets/ORG/NAME@REVISION/PATH`),
fetched with huggingface_hub like models (the Hub cache, `HF_HUB_OFFLINE`), its size checked
before it is downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmerge.errors import ConfigError
from hubmerge.limits import MAX_DATASET_BYTES

#: How a file in a Hub dataset repo is named: huggingface_hub's `HfFileSystem` spelling.
HUB_DATASET_PREFIX = "hf://datasets/"
_HUB_DATASET = re.compile(
    r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w.-]+))?/(?P<file>.+)$"
)

# ShareGPT speaker names mapped to chat-template roles.
_FROM_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_ROLES = frozenset(_FROM_ROLES.values())


@dataclass(frozen=True)
class Sample:
    """One evaluation item: the prompt turns (role/content dicts) and the expected answer."""

    messages: tuple[dict[str, str], ...]
    reference: str


def is_hub_dataset(ref: str) -> bool:
    """Whether `ref` names a file in a Hub dataset repo (`hf://datasets/ORG/NAME/PATH`)."""
    return bool(_HUB_DATASET.match(ref)) and ".." not in ref.split("/")


def dataset_file(ref: str) -> Path:
    """The local file for dataset `ref`: the path itself, or the Hub file, fetched and cached.

    A Hub file larger than `MAX_DATASET_BYTES` is refused before it is downloaded.
    """
    if not ref.startswith(HUB_DATASET_PREFIX):
        return Path(ref)
    match = _HUB_DATASET.match(ref)
    if not match or not is_hub_dataset(ref):
        raise ConfigError(
            f"dataset {ref}: expected hf://datasets/ORG/NAME/PATH (or ORG/NAME@REVISION/PATH)"
        )
    from huggingface_hub import (
        get_hf_file_metadata,
        hf_hub_download,
        hf_hub_url,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    repo, revision, filename = match["repo"], match["rev"], match["file"]
    cached = try_to_load_from_cache(repo, filename, revision=revision, repo_type="dataset")
    if isinstance(cached, str):
        return Path(cached)
    try:
        url = hf_hub_url(repo, filename, repo_type="dataset", revision=revision)
        size = get_hf_file_metadata(url).size
        if size is not None and size > MAX_DATASET_BYTES:
            raise ConfigError(
                f"dataset {ref}: {size:,} bytes, more than the {MAX_DATASET_BYTES:,} a dataset "
                "may have"
            )
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConfigError(
            f"dataset {ref}: not in the local Hub cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"dataset {ref}: Hub download failed: {str(e).splitlines()[0]}") from None


def load_conversations(path: Path | str) -> list[Sample]:
    """Read a JSON list of conversation records from `path` into samples.

    `path` is a local file or a Hub dataset file (`dataset_file`). Raises `ConfigError` with a
    one-line message naming the file (and the record) when the file is missing, too large, not
    a JSON list, empty, or a record is malformed.
    """
    name = str(path)
    file = dataset_file(name)
    try:
        size = file.stat().st_size
        if size > MAX_DATASET_BYTES:
            raise ConfigError(
                f"{name}: {size:,} bytes, more than the {MAX_DATASET_BYTES:,} a dataset may have"
            )
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: dataset file not found") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read dataset ({exc.strerror})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{name}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ConfigError(f"{name}: dataset is empty")
    return [_sample(record, f"{name}: record {index}") for index, record in enumerate(records)]


def _sample(record: Any, where: str) -> Sample:
    """Turn one record into a sample; `where` prefixes every error ("file: record N")."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not an object")
    if "messages" in record:
        turns = [_role_turn(turn, where) for turn in _turn_list(record["messages"], where)]
        missing = "has no assistant turn"
    else:
        key = "conversation" if "conversation" in record else "conversations"
        if key not in record:
            raise ConfigError(f"{where} has none of 'conversation', 'conversations', 'messages'")
        turns = [_from_turn(turn, where) for turn in _turn_list(record[key], where)]
        missing = "has no assistant ('gpt') turn"
    if not turns or turns[-1]["role"] != "assistant":
        if all(turn["role"] != "assistant" for turn in turns):
            raise ConfigError(f"{where} {missing}")
        # Turns after the last answer would silently vanish from the prompt: refuse them.
        raise ConfigError(f"{where} has turns after its last assistant turn")
    if len(turns) == 1:
        raise ConfigError(f"{where} has no prompt turn before its assistant turn")
    return Sample(messages=tuple(turns[:-1]), reference=turns[-1]["content"])


def _turn_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: turns must be a list, got {type(value).__name__}")
    return value


def _from_turn(turn: Any, where: str) -> dict[str, str]:
    """A `{from, value}` turn as a `{role, content}` message."""
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise ConfigError(f"{where} has a turn without a string 'value'")
    speaker = turn.get("from")
    if speaker not in _FROM_ROLES:
        allowed = ", ".join(_FROM_ROLES)
        raise ConfigError(f"{where} has unknown 'from' role {speaker!r} (expected {allowed})")
    return {"role": _FROM_ROLES[speaker], "content": turn["value"]}


def _role_turn(turn: Any, where: str) -> dict[str, str]:
    """A `{role, content}` turn, checked."""
    if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
        raise ConfigError(f"{where} has a message without a string 'content'")
    role = turn.get("role")
    if role not in _ROLES:
        allowed = ", ".join(sorted(_ROLES))
        raise ConfigError(f"{where} has unknown role {role!r} (expected {allowed})")
    return {"role": role, "content": turn["content"]}
