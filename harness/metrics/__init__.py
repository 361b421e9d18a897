"""Evaluation metrics, each defined once: GLUE's in `glue.py` (scikit-learn / SciPy, as the GLUE leaderboard and
Hugging Face `evaluate` compute them; `evaluate` itself fetches its metric code from the hub at run time, so it
fails offline) and SQuAD's in `squad.py` (a port of the official v1.1 and v2.0 scripts). Their docstrings say how.
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
