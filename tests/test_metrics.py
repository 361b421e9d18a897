"""Tests for harness.metrics: GLUE metrics and the official SQuAD v1.1/v2.0 scoring.

Expected values are worked out by hand in comments (and, for GLUE, also
checked against direct scikit-learn / SciPy calls).
"""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from harness.metrics import (
    GLUE_METRIC_NAMES,
    apply_no_ans_threshold,
    compute_exact,
    compute_f1,
    exact_match_score,
    f1_score,
    find_best_thresh,
    get_raw_scores,
    get_tokens,
    glue_metrics,
    make_eval_dict,
    make_qid_to_has_ans,
    metric_max_over_ground_truths,
    normalize_answer,
    resampled_glue_metric,
    squad_v1_scores,
    squad_v2_scores,
)

# --------------------------------------------------------------------------- #
# GLUE
# --------------------------------------------------------------------------- #

# Confusion matrix (positive = 1): TP=3, FN=1, FP=2, TN=4.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PREDS = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])


# squad_v2_scores of one answerable question answered right (no unanswerable ones: their keys are left out)
ONE_QUESTION_ANSWERED_RIGHT = {"exact": 100.0, "f1": 100.0, "total": 1,
                               "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 1}

def test_glue_classification_hand_computed():
    out = glue_metrics(["accuracy", "f1", "mcc"], PREDS, LABELS)
    # accuracy = (TP + TN) / n = 7 / 10
    assert out["accuracy"] == pytest.approx(0.7)
    # F1 (positive class 1) = 2TP / (2TP + FP + FN) = 6 / 9. The F1 of class 0
    # would be 8 / 11, so this also pins pos_label=1.
    assert out["f1"] == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (12 - 2) / sqrt(5 * 4 * 6 * 5) = 10 / sqrt(600) = 1 / sqrt(6)
    assert out["mcc"] == pytest.approx(1 / math.sqrt(6))
    assert list(out) == ["accuracy", "f1", "mcc"]
    assert all(type(v) is float for v in out.values())


def test_glue_matches_sklearn_and_scipy_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    preds = rng.integers(0, 2, size=200)
    out = glue_metrics(["accuracy", "f1", "mcc"], preds, labels)
    assert out["accuracy"] == skm.accuracy_score(labels, preds)
    assert out["f1"] == skm.f1_score(labels, preds)
    assert out["mcc"] == skm.matthews_corrcoef(labels, preds)

    gold = rng.uniform(0, 5, size=200)
    pred = gold + rng.normal(0, 1, size=200)
    out = glue_metrics(["pearson", "spearman"], pred, gold)
    assert out["pearson"] == stats.pearsonr(pred, gold).statistic
    assert out["spearman"] == stats.spearmanr(pred, gold).statistic
    assert all(type(v) is float for v in out.values())


def test_glue_multiclass_accuracy_and_mcc():
    # MNLI-style 3 classes: 4 of 6 correct.
    labels = np.array([0, 1, 2, 0, 1, 2])
    preds = np.array([0, 1, 2, 1, 1, 0])
    out = glue_metrics(["accuracy", "mcc"], preds, labels)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds))


def test_glue_correlations_hand_computed():
    # x = [1, 2, 3], y = [1, 3, 2]: deviations [-1, 0, 1] and [-1, 1, 0],
    # covariance sum = 1, both squared-deviation sums = 2 -> r = 1 / 2.
    # The values are their own ranks, so Spearman is also 1 / 2.
    out = glue_metrics(["pearson", "spearman"], np.array([1.0, 2.0, 3.0]), np.array([1, 3, 2]))
    assert out == pytest.approx({"pearson": 0.5, "spearman": 0.5})
    # Monotone but non-linear: Spearman is exactly 1, Pearson is not.
    out = glue_metrics(["pearson", "spearman"], np.array([1, 2, 3, 4]), np.array([1, 4, 9, 100]))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 0.99


def test_glue_int_predictions_are_cast_to_float_for_correlations():
    out = glue_metrics(["pearson"], np.array([1, 2, 3]), np.array([2, 4, 6]))
    assert out["pearson"] == pytest.approx(1.0)


def test_glue_constant_prediction_does_not_crash():
    labels = np.array([0, 1, 0, 1])
    preds = np.zeros(4, dtype=int)
    out = glue_metrics(["accuracy", "mcc", "pearson", "spearman"], preds, labels)
    assert out["accuracy"] == 0.5
    assert out["mcc"] == 0.0  # sklearn's convention for an undefined MCC
    assert math.isnan(out["pearson"])  # SciPy: undefined correlation -> NaN
    assert math.isnan(out["spearman"])


def test_glue_empty_metric_list_returns_empty_dict():
    assert glue_metrics([], PREDS, LABELS) == {}


def test_glue_accepts_lists():
    assert glue_metrics(["accuracy"], [1, 0, 1], [1, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


def test_glue_unknown_metric_lists_allowed_names():
    with pytest.raises(ValueError) as excinfo:
        glue_metrics(["accuracy", "bleu"], PREDS, LABELS)
    message = str(excinfo.value)
    assert "bleu" in message
    for name in GLUE_METRIC_NAMES:
        assert name in message
    assert set(GLUE_METRIC_NAMES) == {"accuracy", "f1", "mcc", "pearson", "spearman"}


def test_glue_length_mismatch_raises():
    with pytest.raises(ValueError, match="length mismatch"):
        glue_metrics(["accuracy"], np.array([0, 1, 1]), np.array([0, 1]))


def test_glue_non_1d_and_empty_raise():
    with pytest.raises(ValueError, match="1-D"):
        glue_metrics(["pearson"], np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        glue_metrics(["accuracy"], np.array([]), np.array([]))


# Resamples of 60 examples as a bootstrap draws them: weights[b, i] = how often
# example i is in resample b. Resample 0 is constant (one example 60 times).
RESAMPLE_N = 60
RESAMPLE_DRAWS = np.vstack(
    [np.zeros((1, RESAMPLE_N), dtype=int), np.random.default_rng(5).integers(0, RESAMPLE_N, (25, RESAMPLE_N))]
)
RESAMPLE_WEIGHTS = np.stack([np.bincount(d, minlength=RESAMPLE_N) for d in RESAMPLE_DRAWS]).astype(float)


def resample_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(6)
    n = RESAMPLE_N
    return {
        "accuracy": (rng.integers(0, 3, n), rng.integers(0, 3, n)),
        "mcc": (rng.integers(0, 3, n), rng.integers(0, 3, n)),  # multiclass, as sklearn's formula
        "f1": (rng.integers(0, 2, n), rng.integers(0, 2, n)),
        "pearson": (rng.normal(size=n), rng.normal(size=n)),
        "spearman": (rng.integers(0, 5, n).astype(float), rng.normal(size=n).round(1)),  # ties
    }


@pytest.mark.filterwarnings("ignore:F-score is ill-defined")  # the constant resample
@pytest.mark.parametrize("metric", list(GLUE_METRIC_NAMES))
def test_resampled_glue_metric_equals_glue_metrics_on_each_resample(metric):
    prediction, label = resample_cases()[metric]
    fast = resampled_glue_metric(metric, prediction, label, RESAMPLE_WEIGHTS)
    slow = [glue_metrics([metric], prediction[d], label[d])[metric] for d in RESAMPLE_DRAWS]
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12, err_msg=metric)


def test_resampled_glue_metric_treats_weights_as_sklearn_sample_weights():
    cases = resample_cases()
    for metric, reference in (
        ("accuracy", skm.accuracy_score),
        ("f1", lambda y, p, sample_weight: skm.f1_score(y, p, sample_weight=sample_weight)),
        ("mcc", skm.matthews_corrcoef),
    ):
        prediction, label = cases[metric]
        fast = resampled_glue_metric(metric, prediction, label, RESAMPLE_WEIGHTS[1:])
        expected = [reference(label, prediction, sample_weight=w) for w in RESAMPLE_WEIGHTS[1:]]
        np.testing.assert_allclose(fast, expected, rtol=1e-9, atol=1e-12, err_msg=metric)
    prediction, label = cases["spearman"]  # SciPy has no weights: the resample written out
    fast = resampled_glue_metric("spearman", prediction, label, RESAMPLE_WEIGHTS[1:])
    expected = [stats.spearmanr(np.repeat(prediction, w.astype(int)), np.repeat(label, w.astype(int))).statistic
                for w in RESAMPLE_WEIGHTS[1:]]
    np.testing.assert_allclose(fast, expected, rtol=1e-9, atol=1e-12)


def test_resampled_glue_metric_gives_the_degenerate_values_of_glue_metrics():
    """A constant resample: MCC and F1 are 0 (sklearn), correlations NaN (SciPy), never an error."""
    cases = resample_cases()
    constant = RESAMPLE_WEIGHTS[:1]
    assert resampled_glue_metric("mcc", *cases["mcc"], constant)[0] == 0.0
    assert math.isnan(resampled_glue_metric("pearson", *cases["pearson"], constant)[0])
    assert math.isnan(resampled_glue_metric("spearman", *cases["spearman"], constant)[0])
    all_negative = np.zeros(RESAMPLE_N, dtype=int)
    assert resampled_glue_metric("f1", all_negative, all_negative, RESAMPLE_WEIGHTS)[1] == 0.0


def test_resampled_glue_metric_rejects_unknown_names_and_shapes():
    with pytest.raises(ValueError, match="allowed names"):
        resampled_glue_metric("auc", PREDS, LABELS, np.ones((2, len(LABELS))))
    with pytest.raises(ValueError, match=r"weights \(resamples, n\)"):
        resampled_glue_metric("accuracy", PREDS, LABELS, np.ones(len(LABELS)))


# --------------------------------------------------------------------------- #
# SQuAD: normalisation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),
        ("an apple", "apple"),
        ("A dog", "dog"),
        ("  Paris\t\n", "paris"),
        # Punctuation is removed inside words (not replaced by a space).
        ("don't", "dont"),
        ("U.S.A.", "usa"),
        ("well-known", "wellknown"),
        # Articles are removed only as whole words.
        ("theater", "theater"),
        ("Anthem of a nation", "anthem of nation"),
        # Punctuation is removed before articles: "a," becomes the word "a".
        ("a, b", "b"),
        # ...and "a.m." becomes "am", which is not an article.
        ("a.m.", "am"),
        # Only ASCII string.punctuation is removed; curly quotes / em dash stay.
        ("\u201cquoted\u201d", "\u201cquoted\u201d"),
        ("x\u2014y", "x\u2014y"),
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_get_tokens():
    assert get_tokens("The Eiffel  Tower.") == ["eiffel", "tower"]
    assert get_tokens("") == []
    assert get_tokens("the") == []


# --------------------------------------------------------------------------- #
# SQuAD: per-answer scores
# --------------------------------------------------------------------------- #


def test_token_f1_partial_overlap_hand_computed():
    # pred tokens  [quick, brown, fox]        (3, "the" dropped)
    # gold tokens  [quick, brown, dog, jumps] (4)
    # overlap 2 -> P = 2/3, R = 2/4, F1 = 2PR / (P + R) = (2/3) / (7/6) = 4/7
    pred, gold = "The quick brown fox", "quick brown dog jumps"
    assert f1_score(pred, gold) == pytest.approx(4 / 7)
    assert compute_f1(gold, pred) == pytest.approx(4 / 7)


def test_token_f1_counts_duplicates_with_counter_intersection():
    # pred [x, x, x], gold [x, y]: overlap min(3, 1) = 1
    # P = 1/3, R = 1/2, F1 = (2 * 1/6) / (5/6) = 2/5
    assert f1_score("x x x", "x y") == pytest.approx(0.4)
    assert compute_f1("x y", "x x x") == pytest.approx(0.4)


def test_exact_match_is_after_normalisation():
    assert exact_match_score("The Eiffel Tower!", "eiffel tower") is True
    assert exact_match_score("Eiffel", "eiffel tower") is False
    assert compute_exact("eiffel tower", "The Eiffel Tower!") == 1
    assert compute_exact("eiffel tower", "Eiffel") == 0


def test_v1_vs_v2_on_empty_strings():
    # v1.1: no token overlap means F1 = 0, even when both sides are empty.
    assert f1_score("", "") == 0
    # v2.0: if either side is empty, F1 = 1 iff both are empty.
    assert compute_f1("", "") == 1
    assert compute_f1("", "Paris") == 0
    assert compute_f1("Paris", "") == 0
    # Exact match agrees in both versions ("" == "").
    assert exact_match_score("", "") is True
    assert compute_exact("", "") == 1


def test_metric_max_over_ground_truths():
    golds = ["Denver Broncos", "the Broncos", "Broncos"]
    assert metric_max_over_ground_truths(exact_match_score, "Broncos", golds) is True
    # "Denver" vs "denver broncos": P = 1, R = 1/2 -> F1 = 2/3 (best of the three).
    assert metric_max_over_ground_truths(f1_score, "Denver", golds) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- #
# SQuAD v1.1 aggregate
# --------------------------------------------------------------------------- #


def test_squad_v1_scores_hand_computed():
    references = {
        "q1": ["Denver Broncos", "Broncos"],  # pred exact on one gold: EM 1, F1 1
        "q2": ["Santa Clara, California"],  # pred "Santa Clara": EM 0, F1 = 2*(1*2/3)/(5/3) = 0.8
        "q3": ["February 7, 2016"],  # wrong: EM 0, F1 0
        "q4": ["the"],  # gold normalises to "": pred "" -> EM 1, v1 F1 0
    }
    predictions = {"q1": "the Broncos", "q2": "Santa Clara", "q3": "Levi's Stadium", "q4": ""}
    out = squad_v1_scores(predictions, references)
    assert out == pytest.approx({"exact": 50.0, "f1": 100.0 * (1 + 0.8) / 4})


def test_squad_v1_ignores_extra_predictions():
    out = squad_v1_scores({"q1": "x", "extra": "y"}, {"q1": ["x"]})
    assert out == {"exact": 100.0, "f1": 100.0}


def test_squad_v1_errors():
    with pytest.raises(ValueError, match="missing predictions"):
        squad_v1_scores({}, {"q1": ["x"]})
    with pytest.raises(ValueError, match="no gold answer"):
        squad_v1_scores({"q1": ""}, {"q1": []})
    with pytest.raises(ValueError, match="empty"):
        squad_v1_scores({}, {})


# --------------------------------------------------------------------------- #
# SQuAD v2.0
# --------------------------------------------------------------------------- #


def test_v2_unanswerable_questions():
    references = {"na1": [], "na2": []}
    predictions = {"na1": "", "na2": "Paris"}
    exact, f1 = get_raw_scores(predictions, references)
    # Empty gold -> only "" is correct: abstaining = 1, answering = 0.
    assert exact == {"na1": 1, "na2": 0}
    assert f1 == {"na1": 1, "na2": 0}
    out = squad_v2_scores(predictions, references)
    assert out == {
        "exact": 50.0,
        "f1": 50.0,
        "total": 2,
        "NoAns_exact": 50.0,
        "NoAns_f1": 50.0,
        "NoAns_total": 2,
    }


def test_v2_gold_normalising_to_empty_is_dropped():
    # "the" normalises to "" and is dropped; "Paris" remains.
    exact, f1 = get_raw_scores({"q": "Paris"}, {"q": ["the", "Paris"]})
    assert exact == {"q": 1} and f1 == {"q": 1}
    # Because "the" is dropped, abstaining earns nothing here (had it been kept,
    # "" would exactly match it and score 1).
    exact, f1 = get_raw_scores({"q": ""}, {"q": ["the", "Paris"]})
    assert exact == {"q": 0} and f1 == {"q": 0}
    # All golds normalise to "": gold becomes [""], so only "" scores...
    exact, f1 = get_raw_scores({"a": "", "b": "the"}, {"a": ["the"], "b": ["The!", "a"]})
    assert exact == {"a": 1, "b": 1}  # "the" normalises to "" too
    assert f1 == {"a": 1, "b": 1}
    exact, f1 = get_raw_scores({"q": "the cat"}, {"q": ["the"]})
    assert exact == {"q": 0} and f1 == {"q": 0}
    # ...but the question still counts as HasAns (raw gold list is non-empty).
    assert make_qid_to_has_ans({"q": ["the"], "n": []}) == {"q": True, "n": False}
    out = squad_v2_scores({"q": ""}, {"q": ["the"]})
    assert out == ONE_QUESTION_ANSWERED_RIGHT


def test_v2_max_over_several_gold_answers():
    references = {"q": ["Denver Broncos", "Broncos", "the Denver Broncos team"]}
    out = squad_v2_scores({"q": "Broncos"}, references)
    assert out["exact"] == 100.0 and out["f1"] == 100.0
    # "Denver": best F1 is against "denver broncos" (P=1, R=1/2) -> 2/3.
    out = squad_v2_scores({"q": "Denver"}, references)
    assert out["exact"] == 0.0
    assert out["f1"] == pytest.approx(100 * 2 / 3)


# Shared example for the HasAns/NoAns breakdown and threshold search.
#   qid  gold                 pred          na_prob  raw EM  raw F1
#   a    ["Paris"]            "Paris"       0.1      1       1
#   b    []                   "London"      0.2      0       0
#   c    ["big red dog"]      "big red"     0.3      0       0.8  (P=1, R=2/3)
#   d    ["42", "forty-two"]  "42"          0.4      1       1
EX_REFERENCES = {"a": ["Paris"], "b": [], "c": ["big red dog"], "d": ["42", "forty-two"]}
EX_PREDICTIONS = {"a": "Paris", "b": "London", "c": "big red", "d": "42"}
EX_NA_PROBS = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}


def test_v2_has_ans_no_ans_breakdown():
    out = squad_v2_scores(EX_PREDICTIONS, EX_REFERENCES)
    # Default threshold 1.0 overrides nothing.
    # exact = (1 + 0 + 0 + 1) / 4 = 50; f1 = (1 + 0 + 0.8 + 1) / 4 = 70
    # HasAns (a, c, d): exact 2/3, f1 2.8/3; NoAns (b): 0, 0.
    assert out == pytest.approx(
        {
            "exact": 50.0,
            "f1": 70.0,
            "total": 4,
            "HasAns_exact": 100 * 2 / 3,
            "HasAns_f1": 100 * 2.8 / 3,
            "HasAns_total": 3,
            "NoAns_exact": 0.0,
            "NoAns_f1": 0.0,
            "NoAns_total": 1,
        }
    )
    assert "best_exact" not in out
    assert list(out)[:3] == ["exact", "f1", "total"]


def test_v2_no_answer_threshold():
    # Threshold 0.15: b, c, d have na_prob > 0.15 and are treated as "no answer":
    # a keeps 1; b is unanswerable -> 1; c, d are answerable -> 0.
    # exact = f1 = (1 + 1 + 0 + 0) / 4 = 50.
    out = squad_v2_scores(EX_PREDICTIONS, EX_REFERENCES, EX_NA_PROBS, no_answer_threshold=0.15)
    assert out["exact"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(50.0)
    assert out["HasAns_exact"] == pytest.approx(100 / 3)
    assert out["NoAns_exact"] == pytest.approx(100.0)
    # The comparison is strict: na_prob == threshold keeps the prediction.
    scores = apply_no_ans_threshold({"x": 0.5}, {"x": 0.3}, {"x": True}, 0.3)
    assert scores == {"x": 0.5}
    scores = apply_no_ans_threshold(
        {"x": 0.5, "y": 0}, {"x": 0.31, "y": 0.9}, {"x": True, "y": False}, 0.3
    )
    assert scores == {"x": 0.0, "y": 1.0}


def test_find_best_thresh_hand_worked():
    # Official algorithm: start from "abstain on everything" = num_no_ans = 1
    # (only b), threshold 0.0. Walk by increasing na_prob, answering one more
    # question each step; update only on a strict improvement.
    #
    #   step  qid  na   EM diff  EM cum   F1 diff  F1 cum
    #   0     -    -    -        1        -        1
    #   1     a    0.1  +1       2 *      +1       2 *
    #   2     b    0.2  -1       1        -1       1     (no-ans, pred non-empty)
    #   3     c    0.3   0       1        +0.8     1.8
    #   4     d    0.4  +1       2 (tie)  +1       2.8 *
    #
    # EM: best 2 reached at a (the tie at d does not move it): 100*2/4 = 50, thresh 0.1
    # F1: best 2.8 at d: 100*2.8/4 = 70, thresh 0.4
    qid_to_has_ans = make_qid_to_has_ans(EX_REFERENCES)
    exact_raw, f1_raw = get_raw_scores(EX_PREDICTIONS, EX_REFERENCES)
    assert f1_raw == pytest.approx({"a": 1, "b": 0, "c": 0.8, "d": 1})
    best, thresh = find_best_thresh(EX_PREDICTIONS, exact_raw, EX_NA_PROBS, qid_to_has_ans)
    assert best == pytest.approx(50.0) and thresh == 0.1
    best, thresh = find_best_thresh(EX_PREDICTIONS, f1_raw, EX_NA_PROBS, qid_to_has_ans)
    assert best == pytest.approx(70.0) and thresh == 0.4

    out = squad_v2_scores(EX_PREDICTIONS, EX_REFERENCES, EX_NA_PROBS)
    assert out["best_exact"] == pytest.approx(50.0)
    assert out["best_exact_thresh"] == 0.1
    assert out["best_f1"] == pytest.approx(70.0)
    assert out["best_f1_thresh"] == 0.4
    # na_probs <= 1.0 with the default threshold: exact/f1 are unthresholded.
    assert out["exact"] == pytest.approx(50.0) and out["f1"] == pytest.approx(70.0)


def test_find_best_thresh_abstaining_everywhere_wins():
    # Both questions unanswerable and answered wrongly: start at 2 (abstain on
    # both, threshold 0.0); answering x gives 1, answering y gives 0. Best stays
    # 2/2 = 100 at threshold 0.0. An empty prediction on a no-answer costs 0.
    preds = {"x": "foo", "y": "bar"}
    scores = {"x": 0, "y": 0}
    has_ans = {"x": False, "y": False}
    assert find_best_thresh(preds, scores, {"x": 0.5, "y": 0.7}, has_ans) == (100.0, 0.0)
    preds_empty = {"x": "", "y": "bar"}
    # x costs 0 (empty), y costs 1: cumulative 2, 2, 1 -> no strict improvement.
    assert find_best_thresh(preds_empty, scores, {"x": 0.5, "y": 0.7}, has_ans) == (100.0, 0.0)


def test_find_best_thresh_skips_ids_without_score():
    # "ghost" has an na_prob but no score: skipped, and not in the denominator.
    preds = {"a": "Paris"}
    best, thresh = find_best_thresh(preds, {"a": 1}, {"ghost": 0.05, "a": 0.2}, {"a": True})
    assert (best, thresh) == (100.0, 0.2)


def test_make_eval_dict_subset_and_empty_list_means_all():
    exact = {"a": 1, "b": 0}
    f1 = {"a": 1.0, "b": 0.5}
    assert make_eval_dict(exact, f1, ["b"]) == {"exact": 0.0, "f1": 50.0, "total": 1}
    assert make_eval_dict(exact, f1, []) == {"exact": 50.0, "f1": 75.0, "total": 2}


def test_v2_omits_empty_subsets_and_ignores_extra_predictions():
    out = squad_v2_scores({"q": "Paris", "extra": "x"}, {"q": ["Paris"]})
    assert out == ONE_QUESTION_ANSWERED_RIGHT


def test_v2_errors():
    with pytest.raises(ValueError, match="missing predictions"):
        squad_v2_scores({"a": "x"}, {"a": ["x"], "b": []})
    with pytest.raises(ValueError, match="no_answer_probs"):
        squad_v2_scores({"a": "x", "b": ""}, {"a": ["x"], "b": []}, {"a": 0.1})
    with pytest.raises(ValueError, match="empty"):
        squad_v2_scores({}, {})


def test_a_constant_prediction_is_degenerate_for_classes_and_for_regression():
    from harness.metrics import constant_predictions

    frame = lambda *values: pd.DataFrame({"split": "validation", "prediction": list(values)})  # noqa: E731
    assert constant_predictions(frame(1, 1, 1)) is True and constant_predictions(frame(0, 1, 1)) is False
    assert constant_predictions(frame(2.5, 2.5)) is True and constant_predictions(frame(2.5, 2.4)) is False
    two_splits = pd.concat([frame(0, 1), frame(1, 1).assign(split="validation_mismatched")])
    assert constant_predictions(two_splits) is True  # one constant split is enough
    assert constant_predictions(pd.DataFrame({"prediction": ["an answer", "another"]})) is None  # SQuAD spans
    assert constant_predictions(None) is None
