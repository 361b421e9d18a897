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

from harness.metrics.glue import GLUE_METRIC_NAMES, constant_predictions, glue_metrics, resampled_glue_metric
from harness.metrics.squad import (apply_no_ans_threshold, compute_exact, compute_f1, exact_match_score, f1_score,
                                  find_best_thresh, get_raw_scores, get_tokens, make_eval_dict, make_qid_to_has_ans,
                                  metric_max_over_ground_truths, normalize_answer, squad_v1_scores, squad_v2_scores)

__all__ = [
    "GLUE_METRIC_NAMES",
    "glue_metrics",
    "resampled_glue_metric",
    "constant_predictions",
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
