"""Loading conversation datasets: the accepted record layouts and every refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hubmerge.datasets import Sample, load_conversations
from hubmerge.errors import ConfigError


def write(tmp_path: Path, records: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def turn(speaker: str, value: str) -> dict[str, str]:
    return {"from": speaker, "value": value}


def test_conversation_records(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"conversation": [turn("human", "add 1+2"), turn("gpt", "3")]},
            {"conversation": [turn("human", "sort cba"), turn("gpt", "abc")]},
        ],
    )
    assert load_conversations(path) == [
        Sample(messages=({"role": "user", "content": "add 1+2"},), reference="3"),
        Sample(messages=({"role": "user", "content": "sort cba"},), reference="abc"),
    ]


def test_sharegpt_conversations_key(tmp_path: Path) -> None:
    path = write(tmp_path, [{"conversations": [turn("human", "hi"), turn("gpt", "hello")]}])
    assert load_conversations(path) == [
        Sample(messages=({"role": "user", "content": "hi"},), reference="hello")
    ]


def test_messages_records(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ],
    )
    (sample,) = load_conversations(path)
    assert sample.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    )
    assert sample.reference == "hello"


def test_system_turn_and_multi_turn_prompt(tmp_path: Path) -> None:
    """Everything before the last answer is prompt, earlier answers included."""
    path = write(
        tmp_path,
        [
            {
                "conversation": [
                    turn("system", "You add numbers."),
                    turn("human", "add 1+1"),
                    turn("gpt", "2"),
                    turn("human", "add 2+2"),
                    turn("gpt", "4"),
                ]
            }
        ],
    )
    (sample,) = load_conversations(path)
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant", "user"]
    assert sample.messages[2]["content"] == "2"
    assert sample.reference == "4"


def test_mixed_layouts_in_one_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"conversation": [turn("human", "a"), turn("gpt", "b")]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
    )
    first, second = load_conversations(path)
    assert first == second


def test_samples_are_frozen(tmp_path: Path) -> None:
    (sample,) = load_conversations(
        write(tmp_path, [{"conversation": [turn("human", "a"), turn("gpt", "b")]}])
    )
    with pytest.raises(AttributeError):
        sample.reference = "c"  # type: ignore[misc]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json: dataset file not found"):
        load_conversations(tmp_path / "nope.json")


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.json: not valid JSON \(line 1"):
        load_conversations(path)


def test_not_a_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.json: expected a JSON list of records, got dict"):
        load_conversations(write(tmp_path, {"conversation": []}))


def test_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.json: dataset is empty"):
        load_conversations(write(tmp_path, []))


def test_record_without_assistant_turn(tmp_path: Path) -> None:
    good = {"conversation": [turn("human", "a"), turn("gpt", "b")]}
    path = write(tmp_path, [good, good, good, {"conversation": [turn("human", "a")]}])
    with pytest.raises(ConfigError) as caught:
        load_conversations(path)
    assert str(caught.value) == f"{path}: record 3 has no assistant ('gpt') turn"
    assert "\n" not in str(caught.value)


def test_messages_record_without_assistant_turn(tmp_path: Path) -> None:
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(ConfigError, match=r"data\.json: record 0 has no assistant turn"):
        load_conversations(path)


def test_unknown_from_role(tmp_path: Path) -> None:
    path = write(tmp_path, [{"conversation": [turn("bot", "a"), turn("gpt", "b")]}])
    with pytest.raises(ConfigError, match=r"record 0 has unknown 'from' role 'bot' \(expected"):
        load_conversations(path)


def test_unknown_message_role(tmp_path: Path) -> None:
    records = [
        {"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}
    ]
    with pytest.raises(ConfigError, match=r"record 0 has unknown role 'tool'"):
        load_conversations(write(tmp_path, records))


def test_turns_after_last_answer(tmp_path: Path) -> None:
    path = write(
        tmp_path, [{"conversation": [turn("human", "a"), turn("gpt", "b"), turn("human", "c")]}]
    )
    with pytest.raises(ConfigError, match=r"record 0 has turns after its last assistant turn"):
        load_conversations(path)


def test_answer_without_prompt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"record 0 has no prompt turn"):
        load_conversations(write(tmp_path, [{"conversation": [turn("gpt", "b")]}]))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("text", r"record 0 is not an object"),
        ({"turns": []}, r"record 0 has none of 'conversation', 'conversations', 'messages'"),
        ({"conversation": "hi"}, r"record 0: turns must be a list, got str"),
        ({"conversation": [{"from": "human"}]}, r"record 0 has a turn without a string 'value'"),
        ({"messages": [{"role": "user"}]}, r"record 0 has a message without a string 'content'"),
    ],
)
def test_malformed_records(tmp_path: Path, record: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_conversations(write(tmp_path, [record]))


RECORD = {"conversation": [turn("human", "add 1+2"), turn("gpt", "3")]}


def hub_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records: Any) -> str:
    """`hf://datasets/acme/evals/data/add.json`, placed in an offline Hub cache."""
    sha = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hf" / "hub" / "datasets--acme--evals"
    (repo / "snapshots" / sha / "data").mkdir(parents=True)
    (repo / "snapshots" / sha / "data" / "add.json").write_text(json.dumps(records))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return "hf://datasets/acme/evals/data/add.json"


def test_a_dataset_from_a_hub_dataset_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = hub_dataset(tmp_path, monkeypatch, [RECORD])
    (sample,) = load_conversations(ref)
    assert sample.reference == RECORD["conversation"][-1]["value"]
    with pytest.raises(ConfigError, match="hf://datasets/acme/evals/data/missing.json: not in"):
        load_conversations("hf://datasets/acme/evals/data/missing.json")
    with pytest.raises(ConfigError, match="expected hf://datasets/ORG/NAME/PATH"):
        load_conversations("hf://datasets/acme/evals/../secret.json")


def test_datasets_are_size_bounded_before_they_are_read_or_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = hub_dataset(tmp_path, monkeypatch, [RECORD] * 50)
    monkeypatch.setattr("hubmerge.datasets.MAX_DATASET_BYTES", 1000)
    with pytest.raises(ConfigError, match="more than the 1,000 a dataset may have"):
        load_conversations(ref)

    class Metadata:
        size = 10**12

    def download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded a file over the limit")

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", lambda url: Metadata())
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    with pytest.raises(ConfigError, match="1,000,000,000,000 bytes, more than the 1,000"):
        load_conversations("hf://datasets/acme/huge/all.json")
