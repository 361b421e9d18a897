"""SQuAD v1.1 and v2.0 scoring.

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
from collections.abc import Callable, Mapping, Sequence


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
