"""Evaluation datasets: conversation records turned into (prompt turns, reference answer) samples.

Layer-selection methods (OLM) and the zoo score a model by exact match on small conversation
datasets. Three common record layouts are accepted, so datasets exported from ShareGPT-style or
OpenAI-style tools work unchanged:

- `{"conversation": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`
- `{"conversations": [...]}` (the ShareGPT spelling, same turns)
- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`

An optional system turn may come first. The last assistant turn is the reference; every turn
before it is the prompt. Record indices in error messages count from 0, like the JSON list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmerge.errors import ConfigError

# ShareGPT speaker names mapped to chat-template roles.
_FROM_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_ROLES = frozenset(_FROM_ROLES.values())


@dataclass(frozen=True)
class Sample:
    """One evaluation item: the prompt turns (role/content dicts) and the expected answer."""

    messages: tuple[dict[str, str], ...]
    reference: str


def load_conversations(path: Path) -> list[Sample]:
    """Read a JSON list of conversation records from `path` into samples.

    Raises `ConfigError` with a one-line message naming the file (and the record) when the file
    is missing, is not a JSON list, is empty, or a record is malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: dataset file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read dataset ({exc.strerror})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ConfigError(f"{path}: dataset is empty")
    return [_sample(record, f"{path}: record {index}") for index, record in enumerate(records)]


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
