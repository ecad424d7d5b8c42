"""`hubmerge demo`: the front door. OLM on the shipped zoo, offline, on the CPU, in seconds.

It merges the zoo's base model and its task fine-tunes with OLM, scoring candidates on each
task's selection split, writes the model with its recipe, report and card, then measures every
donor and the merged model on the held-out splits, so a new user sees in one command what
layer selection buys (or does not) on models that really learned different things.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hubmerge import zoo
from hubmerge.config import OlmConfig, parse_config
from hubmerge.merge import MergeResult, Reporter, merge

#: Each task's selection split and the mode that fits it: exact answers are matched exactly,
#: the open-ended text corpus is scored by teacher-forced bigram perplexity.
DEMO_MODES = {"add": "exact", "reverse": "exact", "sort": "exact", "count": "exact"}
#: Fine-tunes in the pool: the zoo's task specialists.
DEMO_SAMPLES = 48


@dataclass
class DemoResult:
    merge: MergeResult
    #: model label -> task -> held-out exact-match accuracy.
    accuracy: dict[str, dict[str, float]]


def demo_config() -> OlmConfig:
    """The OLM config the demo runs: every compatible zoo model, every task's selection split."""
    tasks = [t for t in zoo.TASKS if t in DEMO_MODES]
    return parse_config(
        {
            "merge_method": "olm",
            "models": [str(zoo.model_path(name)) for name in zoo.FAMILY],
            "dataset": {
                str(zoo.dataset_path(task, "selection")): {"mode": DEMO_MODES[task]}
                for task in tasks
            },
            "direction": "backward",
            "samples": DEMO_SAMPLES,
            "batch_size": DEMO_SAMPLES,
        },
        "demo",
    )  # type: ignore[return-value]


def run_demo(out_dir: Path, *, force: bool = False, reporter: Reporter | None = None) -> DemoResult:
    """Merge the zoo with OLM into `out_dir`, then measure donors and result on held-out data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from hubmerge.datasets import load_conversations
    from hubmerge.generation import exact_match_accuracy

    logging.disable_progress_bar()
    config = demo_config()
    result = merge(config, out_dir, force=force, reporter=reporter)
    models = {Path(ref).name: Path(ref) for ref in config.models}
    models["merged"] = Path(out_dir)
    accuracy: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        accuracy[label] = {
            task: exact_match_accuracy(
                model, tokenizer, load_conversations(zoo.dataset_path(task, "heldout")),
                max_new_tokens=16, batch_size=128,
            )
            for task in DEMO_MODES
        }  # fmt: skip
    return DemoResult(result, accuracy)
