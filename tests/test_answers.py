"""`hubmerge.answers` against transformers' own greedy `generate` on the shipped zoo models, and
its early decision of misses (which must never change a score)."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hubmerge import answers, zoo
from hubmerge.answers import (
    build_prompts,
    early_miss,
    eos_ids,
    exact_match,
    exact_match_accuracy,
    greedy_decode,
    greedy_generate,
)
from hubmerge.datasets import Sample, load_conversations


@pytest.fixture(scope="module")
def base() -> Iterator[tuple[object, object]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = zoo.model_path(zoo.BASE)
    yield AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(threads)


def mixed_samples(count: int) -> list[Sample]:
    """Samples of every zoo task, so prompts and answers differ in length within a batch."""
    return [
        s for t in zoo.TASKS for s in load_conversations(zoo.dataset_path(t, "heldout"))[:count]
    ]


def test_greedy_answers_equal_transformers_generate(base: tuple) -> None:
    """One left-padded batch of prompts of different lengths gives, row by row, the new tokens
    transformers' greedy `generate` gives for the prompt alone, cut at the first eos."""
    model, tokenizer = base
    samples = mixed_samples(3)
    prompts = build_prompts(tokenizer, samples)
    stops = eos_ids(model, tokenizer)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False)  # fmt: skip
    rows = greedy_decode(model, batch["input_ids"], batch["attention_mask"], 16, stops)
    for prompt, row in zip(prompts, rows, strict=True):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
        expected = generated.tolist()
        cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
        assert row == expected[:cut]
    lengths = {len(row) for row in rows}
    assert len(lengths) > 1  # rows finish at different steps


def test_settled_rows_stop_and_leave_the_others_unchanged(base: tuple) -> None:
    model, tokenizer = base
    prompts = build_prompts(tokenizer, mixed_samples(2))
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False)  # fmt: skip
    args = (model, batch["input_ids"], batch["attention_mask"], 16, eos_ids(model, tokenizer))
    whole = greedy_decode(*args)
    cut = greedy_decode(*args, settled=lambda row, tokens: row == 1 and len(tokens) == 2)
    assert cut[1] == whole[1][:2] and len(whole[1]) > 2
    assert cut[:1] + cut[2:] == whole[:1] + whole[2:]


def byte_tokens(tokenizer: object, data: bytes) -> list[int]:
    """The zoo tokenizer's one-byte tokens spelling `data` (any bytes, valid UTF-8 or not)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in data]  # type: ignore[attr-defined]


@pytest.mark.parametrize("reference", [" café 42 ", "é1", "€ ", "\u00a0ü"])
def test_early_miss_is_never_wrong(base: tuple, reference: str) -> None:
    """Whatever follows a prefix declared a miss, the answer misses; a prefix of the reference,
    even one ending inside a multi-byte character, is never declared a miss. Prefixes and
    continuations are drawn from the reference's tokens and single bytes that begin, continue
    or end other characters (white space among them)."""
    _, tokenizer = base
    misses = early_miss(tokenizer)
    assert misses is not None
    tokens = tokenizer(reference.strip(), add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode(tokens[:n]).endswith("\ufffd") for n in range(len(tokens)))
    for n in range(len(tokens) + 1):
        assert not misses(tokens[:n], reference)
    rng = random.Random(0)
    odd = byte_tokens(tokenizer, b"\xc2\xa0\xe2\x82\xac\xc3\xbc\xa9\x80 x")
    alphabet = [*tokens, *odd, *tokenizer(" x\u00e9", add_special_tokens=False)["input_ids"]]
    decided = 0
    for _ in range(3000):
        prefix = rng.choices(alphabet, k=rng.randint(0, 6))
        if misses(prefix, reference):
            decided += 1
            for _ in range(5):
                rest = rng.choices(alphabet, k=rng.randint(0, 6))
                assert not exact_match(tokenizer.decode(prefix + rest), reference)
    assert decided > 100


def test_early_miss_decides_at_the_first_whole_character(base: tuple) -> None:
    """A first token that is a whole character other than the reference's first is a miss at
    once. So is a first byte that no character the reference may start with begins with, or
    one that begins no character at all; a first byte that may still become the reference's
    first character, or white space, is not."""
    _, tokenizer = base
    misses = early_miss(tokenizer)
    assert misses is not None
    wrong = tokenizer("x", add_special_tokens=False)["input_ids"]
    assert len(wrong) == 1 and misses(wrong, "42")
    assert not misses(wrong, " x1")
    accented = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(accented) > 1 and tokenizer.decode(accented[:1]) == "\ufffd"
    assert not misses(accented[:1], "é1")
    assert not misses(accented[:1], "ü1")  # é and ü share their first byte
    assert misses(accented[:1], "€1")
    assert misses(accented[:1], "1")
    assert misses(accented, "e1")
    assert misses(byte_tokens(tokenizer, b"\xa9"), "é")  # a continuation byte begins nothing
    assert not misses(byte_tokens(tokenizer, b"\xc2"), "1")  # may become a no-break space
    assert misses(byte_tokens(tokenizer, b"1\xc3"), "1 ")  # something follows the 1


def test_early_miss_only_for_decoders_that_allow_it(base: tuple) -> None:
    _, tokenizer = base
    cleaned = copy.deepcopy(tokenizer)
    cleaned.clean_up_tokenization_spaces = True  # " ." -> "." would change earlier text
    assert early_miss(cleaned) is None
    assert early_miss(object()) is None  # no fast tokenizer behind it


def test_accuracy_is_the_same_with_and_without_early_misses(
    base: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out exact match of a fine-tune on another task (about 64 %): stopping missed
    answers early changes no score."""
    model = AutoModelForCausalLM.from_pretrained(zoo.model_path("tiny-add")).eval()
    _, tokenizer = base
    samples = load_conversations(zoo.dataset_path("sort", "heldout"))[:48]
    early = exact_match_accuracy(model, tokenizer, samples, 16, batch_size=16)
    monkeypatch.setattr(answers, "early_miss", lambda _: None)
    late = exact_match_accuracy(model, tokenizer, samples, 16, batch_size=16)
    full = greedy_generate(model, tokenizer, build_prompts(tokenizer, samples), 16, 16)
    hits = sum(exact_match(a, s.reference) for a, s in zip(full, samples, strict=True))
    assert early == late == hits / len(samples)
    assert 0 < early < 1
