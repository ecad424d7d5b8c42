"""OLM's metrics and rank aggregation: pure functions, no model in sight.

Every metric is "lower is better":

- exact: the share of samples whose greedy output misses the reference (`answers.exact_match`:
  equal once both are stripped).
  Ties are broken by the mean negative log-likelihood per reference token (teacher-forced).
- bigram: per sample, exp(mean over adjacent answer-token pairs (i, i+1) of (CE_i + CE_{i+1}));
  a one-token answer uses exp(CE_0). The dataset's score is the mean over samples.
- quality: per sample, greedy text of n words with u distinct words scores
  1 / ((min(n, N) / N) * (u / n) ** 2), N the target length; a text with any CJK ideograph or
  fewer than `min_words` words gets `WORST`. The dataset's score is the mean over samples.

Datasets are combined in one of three ways. The seeds' two combine ranks, so metric scales do
not matter: per dataset the candidates are ranked (ties share the average rank), and the lowest
mean rank wins (`rank_mean`), or the most pairwise majority wins minus losses (`copeland`).
Ranks ignore by how much a candidate is better, so a candidate one sample better on three
datasets beats one twenty samples better on the fourth. `mean` compares magnitudes: the mean
score over datasets when every dataset is exact (one minus the mean accuracy), else the mean of
each dataset's scores rescaled by their spread over the candidates; tie-breakers decide equal
means. Remaining ties go to the earliest candidate, which callers order as: the current layer
first, then pool order.

Whether a better-scoring candidate is better beyond sampling noise is `sign_test`'s question:
per sample, is the candidate better or worse than the current layer (ties dropped), and how
likely is that many wins out of the decided samples under a fair coin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from hubmerge.answers import exact_match

#: The score of a degenerate generation: finite (JSON-safe) and above any reachable score.
WORST = 1e30

# Every CJK Unified Ideographs block (base, extensions A-I) and both compatibility blocks.
_CJK = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef"
    "\U0002ebf0-\U0002ee5f\U0002f800-\U0002fa1f\U00030000-\U000323af]"
)


@dataclass(frozen=True)
class Score:
    """A candidate's result on one dataset: the metric, and a tie-breaker (both lower-better).

    `per_sample` holds each sample's own score (exact: 1 for a miss, 0 for a hit), whose mean
    is `value`: what the paired acceptance test compares.
    """

    value: float
    tiebreak: float = 0.0
    per_sample: tuple[float, ...] = field(default=(), compare=False)

    def key(self) -> tuple[float, float]:
        return (self.value, self.tiebreak)


def bigram_score(token_ce: Sequence[float]) -> float:
    """exp(mean_i(CE_i + CE_{i+1})) over one answer's tokens; exp(CE_0) for a single token."""
    if not token_ce:
        raise ValueError("bigram_score needs at least one answer token")
    if len(token_ce) == 1:
        return math.exp(token_ce[0])
    pairs = [a + b for a, b in zip(token_ce, token_ce[1:], strict=False)]
    return math.exp(sum(pairs) / len(pairs))


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def quality_score(text: str, *, min_words: int, target_words: int) -> float:
    """Penalise short, repetitive or script-collapsed text (see the module docstring)."""
    words = text.split()
    n = len(words)
    if has_cjk(text) or n < max(min_words, 1):
        return WORST
    unique = len(set(words))
    return 1.0 / ((min(n, target_words) / target_words) * (unique / n) ** 2)


def exact_misses(outputs: Sequence[str], references: Sequence[str]) -> tuple[float, ...]:
    """Per output, 1.0 if it misses its reference (`answers.exact_match`), else 0.0."""
    return tuple(float(not exact_match(o, r)) for o, r in zip(outputs, references, strict=True))


def exact_mismatch(outputs: Sequence[str], references: Sequence[str]) -> float:
    """The share of outputs that differ from their reference once both are stripped."""
    return sum(exact_misses(outputs, references)) / len(references)


def average_ranks(scores: Sequence[Score]) -> list[float]:
    """1-based ranks, lower score first; equal scores share the mean of their ranks."""
    order = sorted(range(len(scores)), key=lambda i: scores[i].key())
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]].key() == scores[order[start]].key():
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def aggregate(
    table: Sequence[Sequence[Score]], method: str, modes: Sequence[str] | None = None
) -> tuple[int, list[float]]:
    """Pick the winner of `table[candidate][dataset]`; returns (index, per-candidate merit).

    Merit is the mean rank for `rank_mean` (lower is better), wins minus losses for
    `copeland` (higher is better) and the mean (rescaled) score for `mean` (lower is better;
    `modes`, one per dataset, tell whether every dataset is exact). The earliest candidate
    wins any tie.
    """
    n_datasets = len(table[0])
    columns = [[row[d] for row in table] for d in range(n_datasets)]
    if method == "mean":
        merit = mean_merit(columns, all(m == "exact" for m in modes) if modes else False)
        tiebreak = [sum(row[d].tiebreak for d in range(n_datasets)) for row in table]
        return min(range(len(table)), key=lambda c: (merit[c], tiebreak[c], c)), merit
    ranks = [average_ranks(col) for col in columns]
    if method == "rank_mean":
        merit = [sum(r[c] for r in ranks) / n_datasets for c in range(len(table))]
        return min(range(len(table)), key=lambda c: merit[c]), merit
    if method == "copeland":
        merit = []
        for a in range(len(table)):
            total = 0.0
            for b in range(len(table)):
                if a != b:
                    better = sum(r[a] < r[b] for r in ranks)
                    worse = sum(r[a] > r[b] for r in ranks)
                    total += (better > worse) - (better < worse)
            merit.append(total)
        return max(range(len(table)), key=lambda c: (merit[c], -c)), merit
    raise ValueError(f"unknown aggregate {method!r}")


def mean_merit(columns: Sequence[Sequence[Score]], exact: bool) -> list[float]:
    """Per candidate, the mean over datasets (`columns[dataset][candidate]`) of its score.

    Exact scores are shares of samples, comparable as they are; other metrics are rescaled
    per dataset to [0, 1] over the candidates (a dataset where all score alike adds 0).
    """
    rescaled = []
    for column in columns:
        values = [s.value for s in column]
        if exact:
            rescaled.append(values)
            continue
        low, spread = min(values), max(values) - min(values)
        rescaled.append([(v - low) / spread if spread > 0 else 0.0 for v in values])
    return [sum(col[c] for col in rescaled) / len(columns) for c in range(len(columns[0]))]


@dataclass(frozen=True)
class Paired:
    """A paired comparison of a candidate with the current layer, sample by sample."""

    better: int
    worse: int
    p_value: float


def sign_test(candidate: Sequence[Score], current: Sequence[Score]) -> Paired:
    """One-sided sign test: is `candidate` better than `current` on more samples than chance?

    Samples of every dataset are pooled (each sample one vote, lower score better, ties
    dropped). The p-value is P(X >= better) for X ~ Binomial(better + worse, 1/2), exactly.
    """
    better = worse = 0
    for mine, theirs in zip(candidate, current, strict=True):
        if len(mine.per_sample) != len(theirs.per_sample):
            raise ValueError("sign_test needs per-sample scores of the same samples")
        for a, b in zip(mine.per_sample, theirs.per_sample, strict=True):
            better += a < b
            worse += a > b
    n = better + worse
    tail = sum(math.comb(n, k) for k in range(better, n + 1))
    return Paired(better, worse, tail / 2**n if n else 1.0)
