"""Greedy generation and exact-match scoring of chat models on conversation samples.

Shared by the zoo (to measure what each tiny model learned) and by evaluation-driven merge
methods (OLM scores candidate layer choices with `exact_match_accuracy`). torch and transformers
are imported here only, never on the merge path, so merging does not pay for them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hubmerge.datasets import Sample


def build_prompts(tokenizer: Any, samples: Sequence[Sample]) -> list[str]:
    """Render each sample's prompt turns as the text the model continues with its answer.

    Uses the tokenizer's chat template with the generation prompt appended, as any Hub chat
    model expects. A tokenizer without a template gets a plain `Role: text` layout and a warning,
    because scores measured that way are not comparable with templated ones.
    """
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                list(sample.messages), tokenize=False, add_generation_prompt=True
            )
            for sample in samples
        ]
    warnings.warn(
        "tokenizer has no chat template; using a plain 'Role: text' prompt format",
        stacklevel=2,
    )
    return [
        "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in sample.messages)
        + "Assistant:"
        for sample in samples
    ]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the generation config's, else the tokenizer's eos."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [configured] if isinstance(configured, int) else list(configured)


def greedy_decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    prefill: Callable[[], Any] | None = None,
) -> list[list[int]]:
    """Greedily continue a left-padded batch; per row, the new tokens before its first stop id.

    A plain loop over the model with its KV cache: one forward pass per new token for the whole
    batch, stopping as soon as every row has finished. `model.generate` does the same with far
    more per-step bookkeeping, which dominates on small models. Position ids count real tokens
    only, so a left-padded row computes exactly what it would alone.

    `prefill`, when given, replaces the first pass over the prompt: it must return what that
    pass returns (logits of the last position and a filled `cache`). OLM uses it to start
    every candidate from the layers it shares with the others.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if prefill is None:

        def prefill() -> Any:
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )

    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    steps: list[torch.Tensor] = []
    with torch.inference_mode():
        out = prefill()
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            steps.append(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()):
                break
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(token), 1))], 1
            )
            positions = positions[:, -1:] + 1
            # transformers' cache API: the `Cache` object goes in as `cache` (the old
            # `past_key_values` argument is deprecated and removed in transformers 5.40).
            out = model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                cache=out.cache,
                use_cache=True,
            )
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(len(input_ids))]
    stops = set(stop_ids)
    return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedily continue each prompt; return only the new text, cut at the first eos token.

    Prompts are batched with left padding so every row's last prompt token sits at the end of
    the batch, where generation continues. Prompts are tokenized without extra special tokens
    because the chat template already wrote them.
    """
    stop_ids = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(device)
        rows = greedy_decode(
            model, batch["input_ids"], batch["attention_mask"], max_new_tokens, stop_ids
        )
        outputs += [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return outputs


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    max_new_tokens: int,
    batch_size: int = 32,
) -> float:
    """Fraction of samples whose greedy answer equals the reference (both stripped)."""
    if not samples:
        raise ValueError("exact_match_accuracy needs at least one sample")
    answers = greedy_generate(
        model, tokenizer, build_prompts(tokenizer, samples), max_new_tokens, batch_size
    )
    hits = sum(a.strip() == s.reference.strip() for a, s in zip(answers, samples, strict=True))
    return hits / len(samples)
