"""A zoo of tiny trained Qwen2 models shipped with hubmerge, with their evaluation datasets.

Nothing in hubmerge's tests, demo or benchmarks can download a model, yet layer-selection merges
only mean something between models that learned different things. The zoo is that input: a base
model trained on four synthetic tasks (addition, reversal, sorting, counting) and fine-tunes of
it that each specialise on one task with replay of the base mixture, as real Hub fine-tunes do
(best at their task, still decent at the others), all small enough to live in the package (see
`train.py` for how they are made and `manifest.json` for what each scores).

This module only reads paths and the manifest; it imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hubmerge.errors import SourceError

ZOO_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = ZOO_DIR / "manifest.json"

BASE = "tiny-base"
FINE_TUNES = ("tiny-add", "tiny-reverse", "tiny-sort")
# The mergeable family: same architecture and tokenizer, fine-tunes of one base.
FAMILY = (BASE, *FINE_TUNES)
# Another hidden size, same tokenizer: for tests of incompatible merge inputs.
INCOMPATIBLE = "tiny-incompatible"
MODELS = (*FAMILY, INCOMPATIBLE)

TASKS = ("add", "reverse", "sort", "count")
#: `selection` is what merge methods score candidates on, `validation` a second split they may
#: check choices against, `heldout` what nothing chooses with: where results are reported.
SPLITS = ("selection", "validation", "heldout")


@dataclass(frozen=True)
class ZooModel:
    """A zoo model as the manifest describes it; `accuracy` is held-out exact match per task."""

    name: str
    path: Path
    parent: str | None
    description: str
    accuracy: dict[str, float]


def model_path(name: str) -> Path:
    """Folder of zoo model `name`, loadable with `AutoModelForCausalLM.from_pretrained`."""
    if name not in MODELS:
        raise SourceError(f"unknown zoo model {name!r} (known: {', '.join(MODELS)})")
    return ZOO_DIR / "models" / name


def dataset_path(task: str, split: str) -> Path:
    """JSON conversation dataset of `task` for `split` (one of `SPLITS`)."""
    if task not in TASKS:
        raise SourceError(f"unknown zoo task {task!r} (known: {', '.join(TASKS)})")
    if split not in SPLITS:
        raise SourceError(f"unknown zoo split {split!r} (known: {', '.join(SPLITS)})")
    return ZOO_DIR / "data" / f"{task}_{split}.json"


def list_models() -> list[ZooModel]:
    """Every zoo model, in manifest order, with its measured held-out accuracy."""
    manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    return [
        ZooModel(
            name=name,
            path=model_path(name),
            parent=entry["parent"],
            description=entry["description"],
            accuracy=dict(entry["accuracy"]),
        )
        for name, entry in manifest["models"].items()
    ]
