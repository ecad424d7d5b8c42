"""`hubmerge demo`: the front door. OLM on the shipped zoo, offline, on the CPU, in a minute.

It merges the zoo's base model and its three task fine-tunes with OLM, scoring candidates on each
task's selection split, and writes the model with its recipe, report and card. Then it measures,
on the held-out splits that no choice was made on, every donor, the plain whole-model blends a
user would try first (the mean, task arithmetic), and the merged model, and records the table
in the report and the card: a new user sees in one command what the search buys over simply
taking the best donor or the obvious blend, and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hubmerge import zoo
from hubmerge.config import OlmConfig, parse_config
from hubmerge.merge import MergeResult, Reporter, merge

#: Every zoo task is scored by exact match of the greedy answer.
DEMO_TASKS = zoo.TASKS
#: The OLM settings the demo runs (measured on the zoo, see the README): blends of the pool as
#: candidates next to the pool's own layers, magnitude-aware aggregation, and swaps accepted
#: only past the selection split's sampling noise.
DEMO_SETTINGS: dict[str, Any] = {
    "direction": "backward",
    "aggregate": "mean",
    "candidates": ["layers", "mean", "task_arithmetic"],
    "lambdas": [0.3, 0.5],
    "acceptance": {"test": "sign", "alpha": 0.05},
    "samples": 128,
    "batch_size": 128,
}
#: What the held-out measurement generates and batches.
HELDOUT_MAX_NEW_TOKENS, HELDOUT_BATCH = 16, 256
MERGED = "merged (OLM)"


@dataclass
class DemoResult:
    merge: MergeResult
    #: model label -> task -> held-out exact-match accuracy, in table order: base, donors,
    #: whole-model blends, the merge.
    accuracy: dict[str, dict[str, float]]
    #: The donor with the best composite, and the merge's composite minus that donor's.
    best_donor: str
    margin: float


def composite(scores: dict[str, float]) -> float:
    """The mean accuracy over tasks."""
    return sum(scores.values()) / len(scores)


def demo_config() -> OlmConfig:
    """The OLM config the demo runs: every compatible zoo model, every task's selection split."""
    return parse_config(
        {
            "merge_method": "olm",
            "models": [str(zoo.model_path(name)) for name in zoo.FAMILY],
            "dataset": {
                str(zoo.dataset_path(task, "selection")): {"mode": "exact"} for task in DEMO_TASKS
            },
            **DEMO_SETTINGS,
        },
        "demo",
    )  # type: ignore[return-value]


def run_demo(out_dir: Path, *, force: bool = False, reporter: Reporter | None = None) -> DemoResult:
    """Merge the zoo with OLM into `out_dir`, then measure everything on held-out data."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from hubmerge.card.render import write_card
    from hubmerge.folder import OlmHeldout, OlmReport, read_report, write_report
    from hubmerge.merge import open_sources
    from hubmerge.methods.olm.search import all_candidates, whole_model_tensors

    logging.disable_progress_bar()
    config = demo_config()
    result = merge(config, out_dir, force=force, reporter=reporter)
    out_dir = Path(out_dir)
    sources = open_sources(config.models)
    accuracy = {Path(ref).name: _heldout(AutoModelForCausalLM.from_pretrained(ref), ref)
                for ref in config.models}  # fmt: skip
    _, blends = all_candidates(config)
    for blend in blends:
        model = AutoModelForCausalLM.from_pretrained(config.models[0])
        values = whole_model_tensors(config, sources, blend)
        params = model.state_dict(keep_vars=True)
        for name, value in values.items():
            params[name].data.copy_(value() if callable(value) else _read(value))
        accuracy[f"{blend.label} (whole model)"] = _heldout(model, config.models[0])
    accuracy[MERGED] = _heldout(AutoModelForCausalLM.from_pretrained(out_dir), str(out_dir))

    donors = [Path(ref).name for ref in config.models]
    best = max(donors, key=lambda d: (composite(accuracy[d]), -donors.index(d)))
    margin = composite(accuracy[MERGED]) - composite(accuracy[best])
    report = read_report(out_dir, OlmReport)
    assert report is not None  # the OLM merge just wrote it
    heldout = OlmHeldout(
        metric="exact match, greedy, chat template",
        datasets={task: zoo.dataset_path(task, "heldout").name for task in DEMO_TASKS},
        accuracy=accuracy,
        merged=MERGED,
        best_donor=best,
        margin=margin,
    )
    write_report(replace(report, heldout=heldout), out_dir)
    write_card(out_dir)
    return DemoResult(result, accuracy, best, margin)


def _read(info: Any) -> Any:
    from hubmerge.tensorfile import read_tensor

    return read_tensor(info)


def _heldout(model: Any, tokenizer_ref: str) -> dict[str, float]:
    from transformers import AutoTokenizer

    from hubmerge.answers import exact_match_accuracy
    from hubmerge.datasets import load_conversations

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_ref)
    model.eval()
    return {
        task: exact_match_accuracy(
            model, tokenizer, load_conversations(zoo.dataset_path(task, "heldout")),
            HELDOUT_MAX_NEW_TOKENS, HELDOUT_BATCH,
        )
        for task in DEMO_TASKS
    }  # fmt: skip
