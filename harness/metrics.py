"""Evaluation metrics for the GLUE and SQuAD benchmarks.

GLUE
    :func:`glue_metrics` delegates to scikit-learn / SciPy so that the numbers
    are the same as the reference implementations used by the GLUE
    leaderboard and by Hugging Face ``evaluate`` (which we cannot use here: it
    downloads the metric code from the Hub at run time and fails offline).

    :func:`resampled_glue_metric` computes one of them on many resamples of
    an evaluation set at once (for the report's paired bootstrap), from
    resampled sufficient statistics; tests check it against scikit-learn /
    SciPy on every resample.

SQuAD
    The functions below are a line-by-line port of the official evaluation
    scripts published with the datasets
    (https://rajpurkar.github.io/SQuAD-explorer/):

    * ``evaluate-v1.1.py``: :func:`normalize_answer`, :func:`f1_score`,
      :func:`exact_match_score`, :func:`metric_max_over_ground_truths`, and
      the scoring loop of its ``evaluate`` in :func:`squad_v1_scores`;
    * ``evaluate-v2.0.py``: :func:`normalize_answer`, :func:`get_tokens`,
      :func:`compute_exact`, :func:`compute_f1`, :func:`make_qid_to_has_ans`,
      :func:`get_raw_scores`, :func:`apply_no_ans_threshold`,
      :func:`make_eval_dict`, :func:`find_best_thresh`, and its ``main`` in
      :func:`squad_v2_scores`.

    The official scripts read nested SQuAD JSON files; here the inputs are flat
    dictionaries keyed by question id (``predictions: {id: text}``,
    ``references: {id: [gold texts]}``), which is the only structural change.
    Scoring rules, including the quirks, are kept as in the scripts because
    published SQuAD numbers are computed with them. Scores are in 0..100.
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

__all__ = [
    "GLUE_METRIC_NAMES",
    "glue_metrics",
    "resampled_glue_metric",
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "metric_max_over_ground_truths",
    "squad_v1_scores",
    "get_tokens",
    "compute_exact",
    "compute_f1",
    "make_qid_to_has_ans",
    "get_raw_scores",
    "apply_no_ans_threshold",
    "make_eval_dict",
    "find_best_thresh",
    "squad_v2_scores",
]

# --------------------------------------------------------------------------- #
# GLUE
# --------------------------------------------------------------------------- #


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(skm.accuracy_score(labels, predictions))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    # GLUE reports F1 of the positive class (label 1) for MRPC and QQP.
    return float(skm.f1_score(labels, predictions, average="binary", pos_label=1))


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    # sklearn returns 0.0 when the coefficient is undefined (constant input).
    return float(skm.matthews_corrcoef(labels, predictions))


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A constant input makes the correlation undefined: SciPy returns NaN and
    # emits ConstantInputWarning. NaN is our documented result, so the warning
    # is silenced rather than turned into noise in every degenerate run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = fn(predictions.astype(np.float64), labels.astype(np.float64))
    return float(result.statistic)


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    return _correlation(stats.pearsonr, predictions, labels)


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    return _correlation(stats.spearmanr, predictions, labels)


_GLUE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
}

#: Metric names accepted by :func:`glue_metrics`.
GLUE_METRIC_NAMES: tuple[str, ...] = tuple(_GLUE_METRICS)


def glue_metrics(
    metric_names: Sequence[str], predictions: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Compute GLUE metrics for one task.

    Args:
        metric_names: names from :data:`GLUE_METRIC_NAMES`:

            * ``"accuracy"``: ``sklearn.metrics.accuracy_score``;
            * ``"f1"``: ``sklearn.metrics.f1_score`` (binary, positive label 1,
              as GLUE reports it for MRPC and QQP);
            * ``"mcc"``: ``sklearn.metrics.matthews_corrcoef`` (CoLA);
            * ``"pearson"`` / ``"spearman"``: ``scipy.stats.pearsonr`` /
              ``spearmanr`` on float values (STS-B regression).
        predictions: 1-D array of predicted class ids, or of floats for the
            correlation metrics.
        labels: 1-D array of gold labels, same length as ``predictions``.

    Returns:
        ``{name: value}`` as Python floats, in the order of ``metric_names``.
        Degenerate inputs do not raise: a constant prediction gives
        ``mcc == 0.0`` (sklearn's convention) and ``pearson`` / ``spearman``
        equal to ``nan`` (the correlation is undefined; SciPy returns NaN).

    Raises:
        ValueError: unknown metric name (the message lists the allowed
            names), arrays that are not 1-D, empty, or of different lengths.
    """
    unknown = [name for name in metric_names if name not in _GLUE_METRICS]
    if unknown:
        raise ValueError(
            f"unknown GLUE metric(s) {unknown}; allowed names are {list(GLUE_METRIC_NAMES)}"
        )
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            "predictions and labels must be 1-D arrays, got shapes "
            f"{predictions.shape} and {labels.shape}"
        )
    if len(predictions) != len(labels):
        raise ValueError(
            f"length mismatch: {len(predictions)} predictions vs {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on empty predictions/labels")
    return {name: _GLUE_METRICS[name](predictions, labels) for name in metric_names}


def constant_predictions(predictions: pd.DataFrame) -> bool | None:
    """Whether a run's predictions on an evaluation split are constant: one class for every example, or zero
    variance in regression (a `degenerate` run, whose MCC is 0 and whose correlations are undefined).

    `predictions` is one checkpoint's per-example frame (columns `split`, `prediction`, as the trainer writes
    them); every split is checked and any constant one makes the run degenerate. None when the frame has no
    numeric `prediction` column (SQuAD's answers are spans) or no rows."""
    if predictions is None or predictions.empty or "prediction" not in predictions:
        return None
    if not pd.api.types.is_numeric_dtype(predictions["prediction"]):
        return None
    by_split = (predictions.groupby("split")["prediction"] if "split" in predictions
                else [(None, predictions["prediction"])])
    return bool(any(np.ptp(np.asarray(split_values, dtype=float)) == 0 for _, split_values in by_split))


def resampled_glue_metric(
    metric_name: str, predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """One GLUE metric on every resample of an evaluation set at once.

    ``weights[b, i]`` is how often example ``i`` is in resample ``b`` (a
    bootstrap draw's counts). Result ``[b]`` equals :func:`glue_metrics` on
    resample ``b`` written out example by example, i.e. the scikit-learn /
    SciPy value with ``weights[b]`` as repeat counts, with the same
    conventions for degenerate input (F1 and MCC 0, correlations NaN). A
    bootstrap of 1000 resamples would otherwise call scikit-learn 1000 times
    per variant and seed: MCC, F1, Pearson and Spearman are not means of
    per-example scores, so they are recomputed from resampled sufficient
    statistics (confusion counts, moments, ranks) with the formulas
    scikit-learn and SciPy use.

    Raises:
        ValueError: unknown metric name, or shapes that do not match.
    """
    if metric_name not in _GLUE_METRICS:
        raise ValueError(
            f"unknown GLUE metric {metric_name!r}; allowed names are {list(GLUE_METRIC_NAMES)}"
        )
    prediction, label = np.asarray(predictions), np.asarray(labels)
    weights = np.asarray(weights, dtype=np.float64)
    if prediction.ndim != 1 or prediction.shape != label.shape or weights.ndim != 2 \
            or weights.shape[1] != len(label):
        raise ValueError(
            "predictions and labels must be 1-D arrays of one length n and weights "
            f"(resamples, n), got shapes {prediction.shape}, {label.shape} and {weights.shape}"
        )
    n = weights.shape[1]
    if metric_name == "accuracy":
        return weights @ (prediction == label).astype(np.float64) / n
    if metric_name == "f1":
        # binary, positive class 1, 0 when undefined (scikit-learn's zero_division default)
        tp = weights @ ((prediction == 1) & (label == 1)).astype(np.float64)
        fp = weights @ ((prediction == 1) & (label != 1)).astype(np.float64)
        fn = weights @ ((prediction != 1) & (label == 1)).astype(np.float64)
        denominator = 2 * tp + fp + fn
        return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    if metric_name == "mcc":  # scikit-learn's multiclass formula from the confusion marginals
        classes = np.union1d(label, prediction)
        t = weights @ (label[:, None] == classes).astype(np.float64)
        p = weights @ (prediction[:, None] == classes).astype(np.float64)
        correct = weights @ (prediction == label).astype(np.float64)
        s = weights.sum(axis=1)
        cov_tp = correct * s - (t * p).sum(axis=1)
        cov_pp = s * s - (p * p).sum(axis=1)
        cov_tt = s * s - (t * t).sum(axis=1)
        denominator = cov_tt * cov_pp
        return np.divide(cov_tp, np.sqrt(np.maximum(denominator, 0)), out=np.zeros_like(cov_tp),
                         where=denominator > 0)
    if metric_name == "pearson":
        return _weighted_pearson(weights, prediction.astype(np.float64), label.astype(np.float64))
    # spearman: Pearson of the resample's average ranks (ties included), as SciPy computes it
    return _weighted_pearson(
        weights, _weighted_ranks(prediction, weights), _weighted_ranks(label, weights)
    )


def _weighted_pearson(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of every resample; x and y are per example (n,) or per resample and example (b, n).

    NaN where a resample is constant, as SciPy returns.
    """
    n = weights.shape[1]

    def mean(values: np.ndarray) -> np.ndarray:
        return weights @ values / n if values.ndim == 1 else (weights * values).sum(axis=1) / n

    x = x - x.mean(axis=-1, keepdims=True)  # centred first: the moments below then lose no precision
    y = y - y.mean(axis=-1, keepdims=True)
    mx, my = mean(x), mean(y)
    vx, vy = mean(x * x) - mx * mx, mean(y * y) - my * my
    cov = mean(x * y) - mx * my
    tiny = 1e-12 * max(float((x * x).mean()), float((y * y).mean()), 1e-300)
    valid = (vx > tiny) & (vy > tiny)
    r = np.full(len(cov), np.nan)
    r[valid] = np.clip(cov[valid] / np.sqrt(vx[valid] * vy[valid]), -1.0, 1.0)
    return r


def _weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(b, n): each example's average rank within resample b, where example i occurs
    weights[b, i] times."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]
    # per distinct value
    counts = np.add.reduceat(weights[:, order], np.flatnonzero(new_value), axis=1)
    below = np.cumsum(counts, axis=1) - counts
    ranks = np.empty(weights.shape)
    ranks[:, order] = (below + (counts + 1) / 2)[:, np.cumsum(new_value) - 1]
    return ranks


# --------------------------------------------------------------------------- #
# SQuAD: shared normalisation
# --------------------------------------------------------------------------- #

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace.

    Mirrors ``normalize_answer`` of both ``evaluate-v1.1.py`` and
    ``evaluate-v2.0.py`` (they differ only by v2's ``re.UNICODE`` flag, which
    is the default for ``str`` patterns in Python 3). The steps run in the
    official order: lower -> drop ASCII punctuation (``string.punctuation``,
    so ``"don't"`` becomes ``"dont"`` and non-ASCII punctuation is kept) ->
    replace whole-word articles ``a``/``an``/``the`` by a space (``"theater"``
    is kept) -> collapse whitespace.
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------- #
# SQuAD v1.1 (evaluate-v1.1.py)
# --------------------------------------------------------------------------- #


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of one prediction against one gold answer (v1.1 rule).

    Mirrors ``f1_score`` of ``evaluate-v1.1.py``: bag-of-tokens overlap
    (``Counter`` intersection) of the normalised strings. Unlike v2.0, no
    overlap -- including an empty prediction against an empty gold -- is 0.
    """
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Whether the normalised strings are equal.

    Mirrors ``exact_match_score`` of ``evaluate-v1.1.py`` (returns a bool,
    summed as 0/1 by the caller).
    """
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    """Best score of ``prediction`` over all gold answers of a question.

    Mirrors ``metric_max_over_ground_truths`` of ``evaluate-v1.1.py``.
    """
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


def squad_v1_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Official SQuAD v1.1 exact match and F1 over a set of questions.

    Mirrors ``evaluate`` of ``evaluate-v1.1.py``: for each question in
    ``references`` take the max score over its gold answers, then average and
    scale to 0..100. The official script names the first key
    ``exact_match``; it is ``exact`` here to match :func:`squad_v2_scores`.

    Args:
        predictions: ``{question_id: predicted text}``. Ids not in
            ``references`` are ignored, as in the official script.
        references: ``{question_id: [gold answer texts]}``; each list must be
            non-empty (v1.1 has no unanswerable questions; use
            :func:`squad_v2_scores` for those).

    Returns:
        ``{"exact": float, "f1": float}`` in 0..100.

    Raises:
        ValueError: empty ``references``, a question without a prediction
            (the official script warns and scores it 0; a harness should not
            silently lose predictions), or a question with no gold answer
            (the official script crashes on ``max`` of an empty list).
    """
    if not references:
        raise ValueError("references is empty")
    _check_predictions_cover(predictions, references)
    exact_match = f1 = 0.0
    for qid, ground_truths in references.items():
        if not ground_truths:
            raise ValueError(
                f"question {qid!r} has no gold answer; SQuAD v1.1 scoring requires "
                "at least one (use squad_v2_scores for unanswerable questions)"
            )
        prediction = predictions[qid]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    total = len(references)
    return {"exact": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --------------------------------------------------------------------------- #
# SQuAD v2.0 (evaluate-v2.0.py)
# --------------------------------------------------------------------------- #


def get_tokens(s: str) -> list[str]:
    """Normalised tokens of ``s``; mirrors ``get_tokens`` of ``evaluate-v2.0.py``."""
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    """1 if the normalised strings are equal else 0.

    Mirrors ``compute_exact`` of ``evaluate-v2.0.py``.
    """
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token-level F1 of one prediction against one gold answer (v2.0 rule).

    Mirrors ``compute_f1`` of ``evaluate-v2.0.py``. Differs from the v1.1
    :func:`f1_score` in one case: if the gold or the prediction has no tokens
    (a no-answer), F1 is 1 when both are empty and 0 otherwise, so abstaining
    on an unanswerable question earns full credit.
    """
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise.
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def make_qid_to_has_ans(references: Mapping[str, Sequence[str]]) -> dict[str, bool]:
    """Whether each question is answerable.

    Mirrors ``make_qid_to_has_ans`` of ``evaluate-v2.0.py``: a question is
    "HasAns" when its *raw* gold list is non-empty, even if every gold answer
    normalises to an empty string (see :func:`get_raw_scores`).
    """
    return {qid: bool(answers) for qid, answers in references.items()}


def get_raw_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question exact and F1 before any no-answer thresholding.

    Mirrors ``get_raw_scores`` of ``evaluate-v2.0.py``: gold answers that
    normalise to the empty string (e.g. ``"the"``) are dropped; if none
    remain, the only correct answer is ``""`` (the question is then scored
    like an unanswerable one, while :func:`make_qid_to_has_ans` still counts
    it as HasAns). The score is the max over the remaining gold answers.

    Raises:
        ValueError: a question in ``references`` has no prediction (the
            official script prints a warning, skips it, and then fails with a
            KeyError when splitting HasAns/NoAns).
    """
    _check_predictions_cover(predictions, references)
    exact_scores: dict[str, int] = {}
    f1_scores: dict[str, float] = {}
    for qid, answers in references.items():
        gold_answers = [a for a in answers if normalize_answer(a)]
        if not gold_answers:
            # For unanswerable questions, only correct answer is empty string.
            gold_answers = [""]
        a_pred = predictions[qid]
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def apply_no_ans_threshold(
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
    na_prob_thresh: float,
) -> dict[str, float]:
    """Override scores where the model's no-answer probability is high.

    Mirrors ``apply_no_ans_threshold`` of ``evaluate-v2.0.py``: when
    ``na_probs[qid] > na_prob_thresh`` (strict) the prediction is treated as
    "no answer" and scores 1.0 on an unanswerable question, 0.0 otherwise.
    """
    new_scores: dict[str, float] = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def make_eval_dict(
    exact_scores: Mapping[str, float],
    f1_scores: Mapping[str, float],
    qid_list: Sequence[str] | None = None,
) -> dict[str, float | int]:
    """Average exact/F1 (0..100) and count over ``qid_list`` (default: all).

    Mirrors ``make_eval_dict`` of ``evaluate-v2.0.py``, including its rule
    that an empty ``qid_list`` means "all questions".
    """
    if not qid_list:
        total = len(exact_scores)
        return {
            "exact": 100.0 * sum(exact_scores.values()) / total,
            "f1": 100.0 * sum(f1_scores.values()) / total,
            "total": total,
        }
    total = len(qid_list)
    return {
        "exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
        "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total,
        "total": total,
    }


def find_best_thresh(
    preds: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> tuple[float, float]:
    """Best achievable score (0..100) over no-answer thresholds, and that threshold.

    Mirrors ``find_best_thresh`` of ``evaluate-v2.0.py``. Start from the
    score of abstaining everywhere (= number of unanswerable questions) with
    threshold 0.0; walk the questions by increasing no-answer probability
    (stable sort, so ties keep ``na_probs`` order), "answering" one more each
    step: an answerable question adds its raw score, an unanswerable one costs
    1 if the raw prediction is a non-empty string and 0 if it is empty. The
    threshold moves to a question's probability only on a strict improvement.
    Ids in ``na_probs`` without a score are skipped, as officially.
    """
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        elif preds[qid]:
            diff = -1
        else:
            diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def squad_v2_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    no_answer_probs: Mapping[str, float] | None = None,
    no_answer_threshold: float = 1.0,
) -> dict[str, float | int]:
    """Official SQuAD v2.0 evaluation over a set of questions.

    Mirrors ``main`` of ``evaluate-v2.0.py`` (without the precision-recall
    plots).

    Args:
        predictions: ``{question_id: predicted text}``; ``""`` means "no
            answer". Ids not in ``references`` are ignored, as officially.
        references: ``{question_id: [gold answer texts]}``; an empty list
            marks an unanswerable question.
        no_answer_probs: optional ``{question_id: P(no answer)}`` (the
            official ``--na-prob-file``). When omitted every probability is
            0.0, as in the official script.
        no_answer_threshold: the official ``--na-prob-thresh``: a question
            whose no-answer probability is strictly greater is scored as if
            the model abstained. With the default 1.0 nothing is overridden.

    Returns:
        ``exact``, ``f1`` (0..100) and ``total``; ``HasAns_exact``,
        ``HasAns_f1``, ``HasAns_total`` and ``NoAns_exact``, ``NoAns_f1``,
        ``NoAns_total`` for the answerable / unanswerable subsets, each group
        present only when its subset is non-empty (as officially); and, only
        when ``no_answer_probs`` is given, ``best_exact``,
        ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` from
        :func:`find_best_thresh` on the raw (unthresholded) scores.

    Raises:
        ValueError: empty ``references``, a question without a prediction, or
            a question without a no-answer probability when
            ``no_answer_probs`` is given.
    """
    if not references:
        raise ValueError("references is empty")
    if no_answer_probs is None:
        na_probs: Mapping[str, float] = {k: 0.0 for k in predictions}
    else:
        missing = [qid for qid in references if qid not in no_answer_probs]
        if missing:
            raise ValueError(
                f"no_answer_probs lacks {len(missing)} question id(s), e.g. {missing[:5]}"
            )
        na_probs = no_answer_probs
    qid_to_has_ans = make_qid_to_has_ans(references)
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(predictions, references)
    exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, no_answer_threshold)
    f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, no_answer_threshold)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        has_ans_eval = make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids)
        out_eval.update({f"HasAns_{k}": v for k, v in has_ans_eval.items()})
    if no_ans_qids:
        no_ans_eval = make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids)
        out_eval.update({f"NoAns_{k}": v for k, v in no_ans_eval.items()})
    if no_answer_probs is not None:
        # find_all_best_thresh of the official script.
        best_exact, exact_thresh_value = find_best_thresh(
            predictions, exact_raw, na_probs, qid_to_has_ans
        )
        best_f1, f1_thresh_value = find_best_thresh(predictions, f1_raw, na_probs, qid_to_has_ans)
        out_eval["best_exact"] = best_exact
        out_eval["best_exact_thresh"] = exact_thresh_value
        out_eval["best_f1"] = best_f1
        out_eval["best_f1_thresh"] = f1_thresh_value
    return out_eval


def _check_predictions_cover(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> None:
    """Raise ValueError if a reference question has no prediction."""
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(
            f"missing predictions for {len(missing)} question id(s), e.g. {missing[:5]}"
        )
