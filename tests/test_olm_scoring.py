"""OLM's metrics and rank aggregation on hand-made inputs."""

from __future__ import annotations

import math

import pytest

from hubmerge.methods.olm.scoring import (
    WORST,
    Score,
    aggregate,
    average_ranks,
    bigram_score,
    exact_mismatch,
    quality_score,
)


def test_bigram_pairs_adjacent_tokens_and_handles_one_token() -> None:
    # pairs: (0.5 + 1.5), (1.5 + 1.0) -> mean 2.25
    assert bigram_score([0.5, 1.5, 1.0]) == pytest.approx(math.exp(2.25))
    assert bigram_score([0.7]) == pytest.approx(math.exp(0.7))  # never NaN
    with pytest.raises(ValueError):
        bigram_score([])


@pytest.mark.parametrize(
    "ideograph", ["中", "\u3400", "\U00020000", "\U0002b740", "\uf900", "\U0002f800", "\U00030000"]
)
def test_quality_gives_worst_score_to_any_cjk_ideograph(ideograph: str) -> None:
    text = "one two three four five " + ideograph
    assert quality_score(text, min_words=1, target_words=10) == WORST


def test_quality_formula_and_minimum_length() -> None:
    # n = 6 words, 3 unique, N = 12: 1 / ((6 / 12) * (3 / 6) ** 2) = 8
    assert quality_score("a b c a b c", min_words=2, target_words=12) == pytest.approx(8.0)
    # longer than N: the length factor saturates at 1 -> 1 / (1 * 1) for all-distinct words
    assert quality_score("a b c d e", min_words=2, target_words=4) == pytest.approx(1.0)
    assert quality_score("too short", min_words=3, target_words=4) == WORST
    assert quality_score("", min_words=0, target_words=4) == WORST


def test_exact_mismatch_strips_both_sides() -> None:
    assert exact_mismatch([" 42\n", "7", "abc"], ["42", "8", "abc "]) == pytest.approx(1 / 3)


def test_ties_share_the_average_rank() -> None:
    ranks = average_ranks([Score(0.5), Score(0.1), Score(0.5), Score(0.9), Score(0.5, 1.0)])
    # 0.1 first; the two (0.5, 0) share ranks 2-3; (0.5, 1.0) loses the tie-break; 0.9 last
    assert ranks == [2.5, 1.0, 2.5, 5.0, 4.0]


def test_rank_mean_ignores_scales_and_ties_go_to_the_earliest() -> None:
    table = [  # candidate x dataset; dataset 1 is on a scale 1000x larger
        [Score(0.30), Score(950.0)],
        [Score(0.10), Score(900.0)],
        [Score(0.20), Score(100.0)],
    ]
    index, merit = aggregate(table, "rank_mean")
    assert merit == [3.0, 1.5, 1.5]
    assert index == 1  # tied with 2 on mean rank: the earlier candidate wins


def test_copeland_counts_pairwise_majorities() -> None:
    # 0 beats 1 and 2 on 2 of 3 datasets each; 1 beats 2 on all three.
    table = [
        [Score(1), Score(1), Score(9)],
        [Score(2), Score(2), Score(1)],
        [Score(3), Score(3), Score(2)],
    ]
    index, merit = aggregate(table, "copeland")
    assert merit == [2.0, 0.0, -2.0] and index == 0
    # All equal: everybody ties, the current (first) candidate stays.
    index, _ = aggregate([[Score(1)], [Score(1)]], "copeland")
    assert index == 0
