"""A chat model's answers to conversation samples: prompts, greedy decoding, exact match.

The one home of answer evaluation, shared by the zoo (what each tiny model learned), the demo
(held-out accuracy) and OLM (which scores candidate layers with `greedy_decode` and the same
`exact_match` rule). torch is imported inside the functions that run a model, so the pure parts
(`exact_match`) cost nothing to import; merging never imports this module.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hubmerge.datasets import Sample

if TYPE_CHECKING:
    import torch

#: One decoding step: `(step, tokens, live, attention_mask, position_ids, cache) -> output`,
#: where `tokens` are the ids generated at `step` (one per row), `live` marks the rows whose
#: answer is still open, and the output has the next `logits` and the filled `cache`.
Step = Callable[[int, "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", Any], Any]


#: What a byte-level decoder shows for bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT = "\ufffd"

#: Whether a row's answer is decided already: `(row, tokens generated so far) -> bool`.
Settled = Callable[[int, list[int]], bool]


def exact_match(output: str, reference: str) -> bool:
    """The exact-match rule: the answer equals the reference once both are stripped."""
    return output.strip() == reference.strip()


def early_miss(tokenizer: Any) -> Callable[[Sequence[int], str], bool] | None:
    """A test of whether the tokens generated so far miss `reference` whatever follows them,
    or None where the tokenizer's decoding does not allow deciding early.

    Decided only for byte-level decoders (GPT-2, Llama 3, Qwen, the zoo) without clean-up of
    spaces: their text is the tokens' bytes, concatenated, decoded as UTF-8 with replacement
    characters, so later tokens can change only an unfinished character at the end (bytes
    that begin a UTF-8 sequence without ending it, shown as one replacement character). The
    rest, stripped, must start the stripped reference. The unfinished character will become a
    character whose encoding starts with those bytes, or a replacement character if they
    never finish; unless that may be white space (which `strip` could remove), the reference
    must go on with such a character. Once either fails, no continuation (stopping now
    included) can match: generating on would change no score, only cost time. Deciding on the
    very first token matters most, because a model that misses mostly misses there.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if type(decoder).__name__ != "ByteLevel" or getattr(
        tokenizer, "clean_up_tokenization_spaces", True
    ):
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = {char: byte for byte, char in bytes_to_unicode().items()}

    def piece_bytes(piece: str) -> bytes:
        # As the ByteLevel decoder reads a token: its alphabet's bytes, or, for an added
        # token spelled in plain text, that text's UTF-8.
        if all(char in alphabet for char in piece):
            return bytes(alphabet[char] for char in piece)
        return piece.encode()

    def misses(tokens: Sequence[int], reference: str) -> bool:
        ids = list(tokens)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        target = reference.strip()
        pieces = tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True)
        tail = _unfinished(b"".join(piece_bytes(p) for p in pieces)[-3:])
        if not tail or not text.endswith(_REPLACEMENT):
            return not target.startswith(text.strip())
        done = text[: -len(_REPLACEMENT)]
        if any(space.encode().startswith(tail) for space in _wide_spaces()):
            return not target.startswith(done.strip())
        head = done.lstrip()
        after = target[len(head) : len(head) + 1]
        return not (
            target.startswith(head) and (after == _REPLACEMENT or after.encode().startswith(tail))
        )

    return misses


def _unfinished(data: bytes) -> bytes:
    """The bytes at the end of `data` that begin a UTF-8 character without finishing it."""
    for size in range(1, min(len(data), 3) + 1):
        try:
            data[-size:].decode("utf-8")
        except UnicodeDecodeError as error:
            if error.start == 0 and error.reason == "unexpected end of data":
                return data[-size:]
    return b""


@functools.cache
def _wide_spaces() -> tuple[str, ...]:
    """The white-space characters (as `str.strip` sees them) that take more than one byte."""
    return tuple(c for c in map(chr, range(0x80, sys.maxunicode + 1)) if c.isspace())


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
    step: Step | None = None,
    settled: Settled | None = None,
) -> list[list[int]]:
    """Greedily continue a left-padded batch; per row, the new tokens before its first stop id.

    A plain loop over the model with its KV cache: one forward pass per new token for the whole
    batch, stopping as soon as every row has finished. `model.generate` does the same with far
    more per-step bookkeeping, which dominates on small models. Position ids count real tokens
    only, so a left-padded row computes exactly what it would alone. A finished row keeps being
    fed (the batch keeps its shape) but what it computes is never read.

    `prefill`, when given, replaces the first pass over the prompt: it must return what that
    pass returns (logits of the last position and a filled `cache`); `step` likewise replaces
    each later pass (see `Step`). OLM uses them to start every candidate from the layers it
    shares with the others. A row that `settled` declares decided counts as finished there: its
    tokens end at that point (exact match stops generating an answer that already missed).
    """
    import torch

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

    if step is None:

        def step(
            _: int, tokens: torch.Tensor, __: torch.Tensor, mask: torch.Tensor,
            at: torch.Tensor, cache: Any,
        ) -> Any:  # fmt: skip
            # transformers' cache API: the `Cache` object goes in as `cache` (the old
            # `past_key_values` argument is deprecated and removed in transformers 5.40).
            return model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=at,
                cache=cache,
                use_cache=True,
            )

    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    steps: list[torch.Tensor] = []
    so_far: list[list[int]] = [[] for _ in range(len(input_ids))]
    cut: dict[int, int] = {}
    with torch.inference_mode():
        out = prefill()
        for index in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            steps.append(token)
            finished |= torch.isin(token, stop)
            if settled is not None:
                for row, (value, done) in enumerate(
                    zip(token.tolist(), finished.tolist(), strict=True)
                ):
                    if not done:
                        so_far[row].append(value)
                        if settled(row, so_far[row]):
                            finished[row] = True
                            cut[row] = index + 1
            if bool(finished.all()):
                break
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(token), 1))], 1
            )
            positions = positions[:, -1:] + 1
            out = step(index, token, ~finished, attention_mask, positions, out.cache)
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(len(input_ids))]
    stops = set(stop_ids)
    ends = [next((i for i, t in enumerate(row) if t in stops), len(row)) for row in rows]
    return [
        row[: min(end, cut.get(r, end))]
        for r, (row, end) in enumerate(zip(rows, ends, strict=True))
    ]


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    settled: Settled | None = None,
) -> list[str]:
    """Greedily continue each prompt; return only the new text, cut at the first eos token
    (or where `settled`, given a prompt's index, declares it decided).

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
            model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens,
            stop_ids,
            settled=None if settled is None else functools.partial(_offset, settled, start),
        )
        outputs += [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return outputs


def _offset(settled: Settled, start: int, row: int, tokens: list[int]) -> bool:
    return settled(start + row, tokens)


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    max_new_tokens: int,
    batch_size: int = 32,
) -> float:
    """Fraction of samples whose greedy answer matches the reference (`exact_match`)."""
    if not samples:
        raise ValueError("exact_match_accuracy needs at least one sample")
    misses = early_miss(tokenizer)
    answers = greedy_generate(
        model,
        tokenizer,
        build_prompts(tokenizer, samples),
        max_new_tokens,
        batch_size,
        None if misses is None else lambda i, tokens: misses(tokens, samples[i].reference),
    )
    hits = sum(exact_match(a, s.reference) for a, s in zip(answers, samples, strict=True))
    return hits / len(samples)
