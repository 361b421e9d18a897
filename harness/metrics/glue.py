"""GLUE metrics.

GLUE
    :func:`glue_metrics` delegates to scikit-learn / SciPy so that the numbers
    are the same as the reference implementations used by the GLUE
    leaderboard and by Hugging Face ``evaluate`` (which we cannot use here: it
    downloads the metric code from the Hub at run time and fails offline).

    :func:`resampled_glue_metric` computes one of them on many resamples of
    an evaluation set at once (for the report's paired bootstrap), from
    resampled sufficient statistics; tests check it against scikit-learn /
    SciPy on every resample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

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
