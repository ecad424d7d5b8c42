"""lm-eval results -> leaderboard normalisation, plain task rows and `model-index` entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hubmerge.card.results import load_results, normalise
from hubmerge.errors import CardError

DATA = Path(__file__).parent / "data"
LEADERBOARD = DATA / "lm_eval_leaderboard.json"

# Worked by hand from the fixture's raw scores, with norm(raw, lb) = max(raw - lb, 0) / (1 - lb):
EXPECTED = {
    # (0.6 inst + 0.5 prompt) / 2 * 100
    "IFEval (0-Shot)": 55.00,
    # 8 two-choice tasks at 0.75 -> 50 each; 3 three-choice at 0.5 -> 25; 4 six-choice at 0.5
    # -> 40; 3 five-choice at 0.6 -> 50; 2 seven-choice at 0.1 and temporal_sequences (4) at
    # 0.25 -> 0; geometric_shapes (11) at 0.1 -> 1; colored objects (18) at 0.5 -> 800/17;
    # object_counting (19) at 0.4 -> 110/3. (400 + 75 + 160 + 150 + 1 + 47.0588 + 36.6667) / 24
    "BBH (3-Shot)": 36.24,
    # lm-eval's group row, the size-weighted mean of the seven subtasks, lb 0: (61 + 12 + 7 + 6 +
    # 15 + 48 + 4) right of (307 + 123 + 132 + 280 + 154 + 193 + 135) = 153 / 1324 = 0.11556
    # (the unweighted mean of the subtasks would give 10.66)
    "MATH Lvl 5 (4-Shot)": 11.56,
    # the group row normalised once, lb 0.25: (60 + 150 + 140) / (198 + 546 + 448) = 0.29362,
    # (0.29362 - 0.25) / 0.75 (normalising the subtasks and averaging would give 6.12)
    "GPQA (0-shot)": 5.82,
    # murder 0.55 (2) -> 10, placements 0.3 (5) -> 12.5, team 0.4 (3) -> 10: 32.5 / 3
    "MuSR (0-shot)": 10.83,
    # (0.3 - 0.1) / 0.9 * 100
    "MMLU-PRO (5-shot)": 22.22,
}


def edited(tmp_path: Path, change: object) -> Path:
    """The leaderboard fixture after `change(data)`, saved in tmp_path."""
    data = json.loads(LEADERBOARD.read_text())
    change(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_normalise() -> None:
    assert normalise(0.75, 0.5) == 50.0
    assert normalise(0.2, 0.25) == 0.0  # below random guessing counts as 0, never negative
    assert normalise(1.0, 0.1) == pytest.approx(100.0)


def test_leaderboard_families_as_the_leaderboard_computes_them() -> None:
    evaluation = load_results([LEADERBOARD])
    assert dict(evaluation.leaderboard) == EXPECTED
    assert list(dict(evaluation.leaderboard)) == list(EXPECTED)  # the leaderboard's order
    # (55.00 + 36.24 + 11.56 + 5.82 + 10.83 + 22.22) / 6 = 23.611...
    assert evaluation.average == 23.61
    # Subtasks and lm-eval's size-weighted group rows are consumed, not listed again.
    assert evaluation.tasks == []
    assert evaluation.runs[0].lm_eval_version == "0.4.9" and evaluation.runs[0].date == "2026-01-01"


def test_math_and_gpqa_are_lm_evals_group_rows_normalised_once(tmp_path: Path) -> None:
    def other_group_rows(data: dict) -> None:
        for where in ("results", "groups"):
            data[where]["leaderboard_gpqa"]["acc_norm,none"] = 0.4
            data[where]["leaderboard_math_hard"]["exact_match,none"] = 0.2

    scores = dict(load_results([edited(tmp_path, other_group_rows)]).leaderboard)
    # (0.4 - 0.25) / 0.75 and 0.2 / 1: the group rows, whatever the subtasks say
    assert (scores["GPQA (0-shot)"], scores["MATH Lvl 5 (4-Shot)"]) == (20.0, 20.0)


def test_without_group_rows_the_size_weighted_mean_is_rebuilt(tmp_path: Path) -> None:
    def drop_groups(data: dict) -> None:
        del data["groups"]
        for group in (
            "leaderboard",
            "leaderboard_bbh",
            "leaderboard_gpqa",
            "leaderboard_math_hard",
            "leaderboard_musr",
        ):
            del data["results"][group]

    evaluation = load_results([edited(tmp_path, drop_groups)])
    assert dict(evaluation.leaderboard) == EXPECTED and evaluation.average == 23.61
    assert evaluation.tasks == []

    def fewer_main_questions(data: dict) -> None:
        drop_groups(data)
        data["n-samples"]["leaderboard_gpqa_main"]["effective"] = 1

    # The weights are the file's own counts: diamond 198, extended 546 and main 1 give
    # (60 + 150 + 0.3125 * 1) / 745 = 0.28230 -> 4.31
    scores = dict(load_results([edited(tmp_path, fewer_main_questions)]).leaderboard)
    assert scores["GPQA (0-shot)"] == 4.31

    def no_counts(data: dict) -> None:
        drop_groups(data)
        del data["n-samples"]["leaderboard_math_geometry_hard"]

    # Without the counts the leaderboard's number cannot be rebuilt: listed as plain tasks.
    evaluation = load_results([edited(tmp_path, no_counts)])
    assert "MATH Lvl 5 (4-Shot)" not in dict(evaluation.leaderboard)
    assert len(evaluation.tasks) == 7


def test_a_limited_run_is_shown_but_kept_out_of_model_index(tmp_path: Path) -> None:
    def limited(data: dict) -> None:
        data["config"]["limit"] = 10

    evaluation = load_results([edited(tmp_path, limited), DATA / "lm_eval_zoo.json"])
    assert dict(evaluation.leaderboard) == EXPECTED  # the card's body shows it, marked limited
    assert [run.limit for run in evaluation.runs] == [10, 8]
    assert evaluation.eval_results() == []
    full = load_results([LEADERBOARD, DATA / "lm_eval_zoo.json"]).eval_results()
    assert [r.dataset_name for r in full] == list(EXPECTED)  # the zoo's limited rows left out


def test_an_incomplete_family_is_listed_raw(tmp_path: Path) -> None:
    def drop_navigate(data: dict) -> None:
        del data["results"]["leaderboard_bbh_navigate"]

    evaluation = load_results([edited(tmp_path, drop_navigate)])
    assert "BBH (3-Shot)" not in dict(evaluation.leaderboard)
    assert evaluation.average is None  # only five of six families
    rows = {(r.task, r.metric): r for r in evaluation.tasks}
    assert len(rows) == 23
    row = rows[("leaderboard_bbh_snarks", "acc_norm")]
    assert (row.value, row.filter, row.shots, row.version) == (0.75, "none", 3, "1.0")
    assert row.stderr == pytest.approx((0.75 * 0.25 / 250) ** 0.5, abs=1e-6)


def test_a_family_run_with_other_shots_is_listed_raw(tmp_path: Path) -> None:
    def five_shot_mmlu_pro_as_zero(data: dict) -> None:
        data["n-shot"]["leaderboard_mmlu_pro"] = 0

    evaluation = load_results([edited(tmp_path, five_shot_mmlu_pro_as_zero)])
    assert "MMLU-PRO (5-shot)" not in dict(evaluation.leaderboard)
    assert [(r.task, r.metric, r.shots) for r in evaluation.tasks] == [
        ("leaderboard_mmlu_pro", "acc", 0)
    ]


def test_plain_tasks_keep_filters_and_missing_stderr(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "results": {
                    "gsm8k": {
                        "alias": "gsm8k",
                        "exact_match,strict-match": 0.25,
                        "exact_match_stderr,strict-match": 0.01,
                        "exact_match,flexible-extract": 0.3,
                        "exact_match_stderr,flexible-extract": "N/A",
                    }
                },
                "versions": {"gsm8k": 3.0},
                "n-shot": {"gsm8k": 5},
            }
        )
    )
    evaluation = load_results([path])
    assert [(r.filter, r.value, r.stderr) for r in evaluation.tasks] == [
        ("strict-match", 0.25, 0.01),
        ("flexible-extract", 0.3, None),
    ]
    names = [r.metric_name for r in evaluation.eval_results()]
    assert names == ["exact_match (strict-match)", "exact_match (flexible-extract)"]


def test_model_index_round_trips() -> None:
    results = load_results([LEADERBOARD, DATA / "lm_eval_zoo.json"]).eval_results()
    assert len(results) == 6  # the zoo's results were limited to 8 documents: not listed
    name, parsed = model_index_to_eval_results(eval_results_to_model_index("m", results))
    assert name == "m" and parsed == results
    bbh = results[1]
    assert (bbh.dataset_name, bbh.metric_type, bbh.metric_value) == (
        "BBH (3-Shot)",
        "acc_norm",
        36.24,
    )
    assert bbh.dataset_args == {"num_few_shot": 3}


def test_bad_results_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(CardError, match="absent.json: results file not found"):
        load_results([missing])
    with pytest.raises(CardError, match="is also in"):
        load_results([LEADERBOARD, LEADERBOARD])
