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
    sign_test,
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


def test_mean_counts_how_much_better_where_ranks_do_not() -> None:
    """Candidate 1 is one sample better on three exact datasets; candidate 2 is 20 samples
    better on the fourth. Ranks prefer 1; the mean accuracy prefers 2, as a user would."""
    current = [Score(0.30), Score(0.30), Score(0.30), Score(0.50)]
    small = [Score(0.29), Score(0.29), Score(0.29), Score(0.51)]
    large = [Score(0.31), Score(0.31), Score(0.31), Score(0.30)]
    table = [current, small, large]
    assert aggregate(table, "rank_mean")[0] == 1
    index, merit = aggregate(table, "mean", ["exact"] * 4)
    assert index == 2
    assert merit == pytest.approx([0.35, 0.345, 0.3075])


def test_mean_rescales_other_metrics_by_their_spread_and_breaks_ties() -> None:
    # bigram perplexities in the hundreds next to an exact share: each rescaled to [0, 1].
    table = [[Score(0.5), Score(300.0)], [Score(0.4), Score(310.0)], [Score(0.6), Score(290.0)]]
    index, merit = aggregate(table, "mean", ["exact", "bigram"])
    assert merit == pytest.approx([0.5, 0.5, 0.5]) and index == 0  # a tie: the current stays
    tied = [[Score(0.5, 2.0)], [Score(0.5, 1.0)]]
    assert aggregate(tied, "mean", ["exact"])[0] == 1  # equal means: lower tie-breaker


def test_sign_test_matches_scipy_binomtest() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    current = Score(0.0, per_sample=tuple([1.0] * 30 + [0.0] * 30))
    candidate = Score(0.0, per_sample=tuple([0.0] * 20 + [1.0] * 10 + [1.0] * 5 + [0.0] * 25))
    paired = sign_test([candidate], [current])
    assert (paired.better, paired.worse) == (20, 5)  # 35 samples tie and do not count
    expected = scipy_stats.binomtest(20, 25, 0.5, alternative="greater").pvalue
    assert paired.p_value == pytest.approx(expected, rel=1e-12)
    # Samples of several datasets are pooled; without any decided sample nothing is shown.
    assert sign_test([current, current], [current, current]).p_value == 1.0
    with pytest.raises(ValueError, match="same samples"):
        sign_test([Score(0.0, per_sample=(1.0,))], [current])
