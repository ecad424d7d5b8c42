"""Train the tiny model zoo from scratch, deterministically, in a few minutes on 2 CPU cores.

    python -m hubmerge.zoo.train --out hubmerge/zoo/models

writes one Hugging Face model folder per zoo model under `--out`, the evaluation splits under
`--data` (default: `data/` next to `--out`) and `manifest.json` next to `--out`. The recipe:

1. a character-level tokenizer (byte-level BPE without merges) with ChatML special tokens
   and chat template, shared by all models;
2. `tiny-base`: a Qwen2 model trained from random weights on a mixture of every task plus
   templated plain text, stopped while it is still mediocre at the tasks;
3. one fine-tune of `tiny-base` per specialised task, trained like a real Hub fine-tune: mostly
   on its task, with 30 % replay of the base mixture, so each is best at its task and still
   decent at the others (a fine-tune without replay forgets everything else, which no merge
   method can be judged on);
4. `tiny-incompatible`: a randomly initialised Qwen2 with another hidden size, for bad-input
   tests;
5. every model reloaded from disk and scored on every task's held-out split, into the manifest.

Same seed, same torch version, same thread count: same weights, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hubmerge.answers import exact_match_accuracy
from hubmerge.datasets import load_conversations
from hubmerge.zoo.tasks import TASK_MAKERS, draw_unique, make_text, write_records

SEED = 1234
# One thread: the box has two cores and the other is often busy; a busy second thread makes
# every step wait for it. A fixed count also keeps float reductions, hence weights, identical.
THREADS = 1
# Selection is what OLM scores candidates on: at 128 prompts one prompt is under a point, so no
# single prompt decides a swap. Validation is a second split OLM may use to veto swaps; held-out
# is never seen by any method and is what the demo and the manifest report.
SPLIT_SIZES = {"selection": 128, "validation": 64, "heldout": 256}
# Fraction of each fine-tune's batches drawn from the base mixture (replay).
REPLAY = 0.3
# The longest answer (14 letters) plus <|im_end|>, with slack: a rambling answer is wrong anyway.
EVAL_MAX_NEW_TOKENS = 16
EVAL_BATCH_SIZE = 64

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's pre-tokenization regex. transformers 5 rebuilds any `qwen2` tokenizer with Qwen2's own
# pipeline (NFC, this split, byte-level) from tokenizer.json's vocab and merges, so ours uses
# exactly that pipeline: what we train with is then what every transformers version loads.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Architecture of the family (all but tiny-incompatible): 0.2 M parameters, 0.8 MB in float32.
ARCHITECTURE = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
INCOMPATIBLE_ARCHITECTURE = {**ARCHITECTURE, "hidden_size": 32, "intermediate_size": 96}


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is made; recorded verbatim in the manifest."""

    name: str
    description: str
    parent: str | None
    mixture: dict[str, float]  # task name (or "text") -> sampling weight
    steps: int
    lr: float
    batch_size: int = 32
    warmup_steps: int = 0
    seed: int = SEED


BASE_MIXTURE = {"add": 0.28, "reverse": 0.15, "sort": 0.15, "count": 0.25, "text": 0.17}


def with_replay(task: str, replay: float = REPLAY) -> dict[str, float]:
    """A fine-tune's mixture: its task, plus `replay` of the base mixture (weights sum to 1)."""
    mixture = {source: round(replay * weight, 6) for source, weight in BASE_MIXTURE.items()}
    mixture[task] = round(mixture[task] + 1 - replay, 6)
    return mixture


# Mixture weights and step counts were tuned so that the base ends mediocre (it is mid-way
# through learning each task) and one short fine-tune per task lifts that task well above it.
RECIPES = (
    Recipe(
        name="tiny-base",
        description="Base model: all four tasks plus templated plain text, from random weights.",
        parent=None,
        mixture=BASE_MIXTURE,
        steps=2200,
        lr=3e-3,
        warmup_steps=60,
    ),
    *(
        Recipe(
            name=f"tiny-{task}",
            description=f"tiny-base fine-tuned on {what}, with {REPLAY:.0%} replay of its mixture.",
            parent="tiny-base",
            mixture=with_replay(task),
            steps=500,
            lr=1e-3,
        )
        for task, what in (
            ("add", "addition"),
            ("reverse", "string reversal"),
            ("sort", "sorting letters"),
        )
    ),
)
INCOMPATIBLE = "tiny-incompatible"


def _byte_symbols() -> list[str]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode): symbol of byte b at index b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [symbols[b] for b in range(256)]


def build_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE with no merges: one token per byte, so one per ASCII character.

    Token id = byte value (0-255), then the three special tokens (256-258). With no merges every
    character stays its own token and `decode` returns the text exactly (after Unicode NFC
    normalisation, which only matters outside ASCII).
    """
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab |= {token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def save_tokenizer(tokenizer: tokenizers.Tokenizer, folder: Path) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` carrying the chat template."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": ARCHITECTURE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def chat_prefix(prompt: str) -> str:
    """The chat template's rendering of one user turn plus the generation prompt."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"


class Sampler:
    """Draws training batches from a task mixture, never a prompt of an evaluation split."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, recipe: Recipe, held: dict[str, set[str]]
    ) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(recipe.seed)
        self.sources = list(recipe.mixture)
        self.weights = list(recipe.mixture.values())
        self.held = held
        self.pad_id = token_id(tokenizer, ENDOFTEXT)
        self.im_end_id = token_id(tokenizer, IM_END)

    def _example(self, source: str) -> tuple[list[int], list[int]]:
        """Token ids and labels for one example; prompts are masked out of the loss."""
        if source == "text":
            ids = self.tokenizer.encode(make_text(self.rng)).ids + [self.pad_id]
            return ids, ids
        prompt, answer = TASK_MAKERS[source](self.rng)
        while prompt in self.held[source]:
            prompt, answer = TASK_MAKERS[source](self.rng)
        prefix = self.tokenizer.encode(chat_prefix(prompt)).ids
        target = self.tokenizer.encode(answer).ids + [self.im_end_id]
        return prefix + target, [-100] * len(prefix) + target

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A right-padded batch: causal attention never lets a real token see the padding."""
        sources = self.rng.choices(self.sources, weights=self.weights, k=size)
        examples = [self._example(source) for source in sources]
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        for row, (ids, targets) in enumerate(examples):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(targets)] = torch.tensor(targets)
        return input_ids, labels


def token_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
    """The id of one of the tokenizer's own special tokens (it always has them)."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"the zoo tokenizer lacks {token}")
    return found


def new_model(tokenizer: tokenizers.Tokenizer, architecture: Mapping[str, Any]) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 model for the character vocabulary."""
    config = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=None,
        eos_token_id=token_id(tokenizer, IM_END),
        pad_token_id=token_id(tokenizer, ENDOFTEXT),
        **architecture,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[token_id(tokenizer, IM_END), token_id(tokenizer, ENDOFTEXT)],
        pad_token_id=token_id(tokenizer, ENDOFTEXT),
    )
    return model


def train(model: Qwen2ForCausalLM, sampler: Sampler, recipe: Recipe, log_every: int = 100) -> None:
    """AdamW with linear warmup and cosine decay to 10% of the peak learning rate."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Eager attention trains faster than SDPA on CPU at these sizes; it is not saved in the
    # config, so users load the default implementation.
    model.set_attn_implementation("eager")
    model.train()
    for step in range(recipe.steps):
        input_ids, labels = sampler.batch(recipe.batch_size)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            print(f"  {recipe.name} step {step + 1}/{recipe.steps} loss {loss.item():.4f}")
    model.eval()


def save_model(model: Qwen2ForCausalLM, tokenizer: tokenizers.Tokenizer, folder: Path) -> None:
    """A self-contained Hub-style folder: weights, config, generation config, tokenizer."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)


def write_datasets(data_dir: Path) -> dict[str, set[str]]:
    """Write every task's evaluation splits; return all their prompts per task."""
    data_dir.mkdir(parents=True, exist_ok=True)
    held: dict[str, set[str]] = {}
    for index, (task, maker) in enumerate(TASK_MAKERS.items()):
        # A seed per task, offset from the training seeds, so splits never depend on each other.
        rng = random.Random(SEED * 1000 + index)
        held[task] = set()
        for split, size in SPLIT_SIZES.items():
            pairs = draw_unique(maker, rng, size, held[task])
            write_records(data_dir / f"{task}_{split}.json", pairs)
    return held


def measure(folder: Path, data_dir: Path) -> dict[str, float]:
    """Held-out exact match of the saved model on every task, loaded as a user would load it."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {
        task: exact_match_accuracy(
            model,
            tokenizer,
            load_conversations(data_dir / f"{task}_heldout.json"),
            EVAL_MAX_NEW_TOKENS,
            EVAL_BATCH_SIZE,
        )
        for task in TASK_MAKERS
    }


def main(argv: list[str] | None = None) -> None:
    """Build the whole zoo: datasets, models and manifest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model folders")
    parser.add_argument("--data", type=Path, help="folder for datasets (default: OUT/../data)")
    args = parser.parse_args(argv)
    out: Path = args.out
    data_dir: Path = args.data or out.parent / "data"
    manifest_path = out.parent / "manifest.json"

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()

    held = write_datasets(data_dir)
    tokenizer = build_tokenizer()
    entries: dict[str, dict[str, object]] = {}
    for recipe in RECIPES:
        clock = time.perf_counter()
        torch.manual_seed(recipe.seed)
        if recipe.parent is None:
            model = new_model(tokenizer, ARCHITECTURE)
        else:
            model = Qwen2ForCausalLM.from_pretrained(out / recipe.parent)
        train(model, Sampler(tokenizer, recipe, held), recipe)
        save_model(model, tokenizer, out / recipe.name)
        entries[recipe.name] = {
            "description": recipe.description,
            "parent": recipe.parent,
            "seed": recipe.seed,
            "steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "warmup_steps": recipe.warmup_steps,
            "schedule": "linear warmup, cosine decay to 0.1 x lr, AdamW wd 0.01, clip 1.0",
            "mixture": recipe.mixture,
            "replay": REPLAY if recipe.parent is not None else None,
            "params": model.num_parameters(),
        }
        print(f"{recipe.name}: trained in {time.perf_counter() - clock:.1f} s")

    torch.manual_seed(SEED)
    incompatible = new_model(tokenizer, INCOMPATIBLE_ARCHITECTURE)
    save_model(incompatible, tokenizer, out / INCOMPATIBLE)
    entries[INCOMPATIBLE] = {
        "description": "Random weights, hidden size 32: cannot be merged with the others.",
        "parent": None,
        "seed": SEED,
        "steps": 0,
        "params": incompatible.num_parameters(),
    }

    for name, entry in entries.items():
        entry["accuracy"] = measure(out / name, data_dir)
        entry["bytes"] = sum(f.stat().st_size for f in (out / name).iterdir())
        print(name, entry["accuracy"])

    manifest = {
        "about": "Tiny trained Qwen2 models made by `python -m hubmerge.zoo.train`.",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": THREADS,
        "tokenizer": {
            "kind": "byte-level BPE without merges (one token per ASCII character)",
            "vocab_size": tokenizer.get_vocab_size(),
        },
        "architecture": ARCHITECTURE,
        "training_data": (
            "drawn on the fly from hubmerge.zoo.tasks with random.Random(seed), "
            "every prompt of an evaluation split rejected; loss on answers (+ <|im_end|>) "
            "for tasks, on every token for text"
        ),
        "splits": SPLIT_SIZES,
        "evaluation": {
            "split": "heldout",
            "metric": "exact match (stripped)",
            "max_new_tokens": EVAL_MAX_NEW_TOKENS,
            "batch_size": EVAL_BATCH_SIZE,
        },
        "tasks": {
            task: {
                "description": (maker.__doc__ or "").strip(),
                **{split: f"{data_dir.name}/{task}_{split}.json" for split in SPLIT_SIZES},
            }
            for task, maker in TASK_MAKERS.items()
        },
        "models": {name: {"path": f"{out.name}/{name}", **e} for name, e in entries.items()},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"zoo built in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
