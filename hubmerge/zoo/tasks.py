"""Synthetic tasks with exact answers, and the plain-text corpus, that the zoo is trained on.

Every task is a function from a seeded `random.Random` to one (prompt, answer) pair, so that data
can be drawn without limit for training and reproduced exactly for the shipped evaluation splits.
This module is pure Python (no torch) so that tests and benchmarks can generate more data cheaply.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable
from pathlib import Path

Pair = tuple[str, str]

# Addition operands have 1 to 2 digits: carries matter, yet the 0.2 M-parameter models learn it
# in minutes of CPU. With 3 digits, base and fine-tune alike stayed at 0-3% in our trials.
ADD_MAX_DIGITS = 2
# String lengths (inclusive) per task; the ranges set each task's difficulty for the base model.
REVERSE_LENGTHS = (3, 12)
SORT_LENGTHS = (3, 14)
# Counting draws from a 3-letter alphabet, so the counted letter occurs 0..9 times.
COUNT_ALPHABET = "abc"
COUNT_MIN, COUNT_MAX = 3, 9

# Plain-text corpus vocabulary: simple templated sentences, for fluency on non-task text.
_SUBJECTS = ("the cat", "a dog", "the bird", "my friend", "the old man", "a child", "the teacher")
_VERBS = ("sees", "likes", "finds", "takes", "paints", "wants", "holds")
_ADJECTIVES = ("red", "small", "big", "green", "quiet", "happy", "blue")
_OBJECTS = ("ball", "house", "tree", "book", "river", "hat", "cup")
_PLACES = ("in the park", "at home", "near the river", "on the hill", "in the garden")


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, ADD_MAX_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_add(rng: random.Random) -> Pair:
    """`add 47+38` -> `85`: addition of two numbers of 1-2 digits, carries included."""
    a, b = _number(rng), _number(rng)
    return f"add {a}+{b}", str(a + b)


def _letters(rng: random.Random, lengths: tuple[int, int]) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*lengths)))


def make_reverse(rng: random.Random) -> Pair:
    """`reverse abcde` -> `edcba`: 3-12 random lowercase letters, reversed."""
    word = _letters(rng, REVERSE_LENGTHS)
    return f"reverse {word}", word[::-1]


def make_sort(rng: random.Random) -> Pair:
    """`sort dbca` -> `abcd`: 3-14 random lowercase letters in order, repeats kept."""
    word = _letters(rng, SORT_LENGTHS)
    return f"sort {word}", "".join(sorted(word))


def make_count(rng: random.Random) -> Pair:
    """`count a in abcaab` -> `3`: occurrences of a letter in 3-9 letters from `abc`."""
    word = "".join(rng.choices(COUNT_ALPHABET, k=rng.randint(COUNT_MIN, COUNT_MAX)))
    letter = rng.choice(COUNT_ALPHABET)
    return f"count {letter} in {word}", str(word.count(letter))


TASK_MAKERS: dict[str, Callable[[random.Random], Pair]] = {
    "add": make_add,
    "reverse": make_reverse,
    "sort": make_sort,
    "count": make_count,
}


def make_text(rng: random.Random) -> str:
    """One templated sentence (the fluency part of the base mixture)."""
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} the "
    sentence += f"{rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
    return sentence[0].upper() + sentence[1:]


def draw_unique(
    maker: Callable[[random.Random], Pair], rng: random.Random, count: int, exclude: set[str]
) -> list[Pair]:
    """Draw `count` pairs whose prompts are distinct and not in `exclude` (which is extended).

    Evaluation splits are drawn this way so that selection and held-out never share a prompt,
    and the training sampler rejects every prompt in `exclude`.
    """
    pairs: list[Pair] = []
    while len(pairs) < count:
        prompt, answer = maker(rng)
        if prompt not in exclude:
            exclude.add(prompt)
            pairs.append((prompt, answer))
    return pairs


def to_records(pairs: Iterable[Pair]) -> list[dict[str, list[dict[str, str]]]]:
    """Pairs as conversation records (`{"conversation": [human turn, gpt turn]}`)."""
    return [
        {"conversation": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
        for p, a in pairs
    ]


def write_records(path: Path, pairs: Iterable[Pair]) -> None:
    """Write pairs as a JSON list of conversation records, one record per line (diffable)."""
    records = to_records(pairs)
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")
