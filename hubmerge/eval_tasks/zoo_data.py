"""Data loader for the shipped zoo tasks: the zoo's held-out splits, wherever hubmerge is installed.

lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset` as is, so a relative path
would resolve against the working directory. The YAMLs name this loader as `custom_dataset`
instead, and it resolves their `data_files` against this folder (which lm-eval also loads this
file from), then turns each conversation record into `{prompt, answer}` with hubmerge's own
parser: the last assistant turn is the answer, the user turn before it the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def load_split(data_files: dict[str, str], **_: Any) -> Any:
    """A `DatasetDict` with one split per `data_files` entry (paths relative to this folder).

    lm-eval also passes the task's metadata (version, model arguments) as keywords: ignored.
    """
    import datasets

    from hubmerge.datasets import load_conversations

    splits = {}
    for split, name in data_files.items():
        samples = load_conversations(HERE / name)
        splits[split] = datasets.Dataset.from_list(
            [{"prompt": s.messages[-1]["content"], "answer": s.reference} for s in samples]
        )
    return datasets.DatasetDict(splits)
