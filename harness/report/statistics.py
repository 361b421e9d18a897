"""Which differences are real: a paired bootstrap over evaluation examples, all seeds at once."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from harness.errors import ReportError
from harness.metrics import resampled_glue_metric


RESAMPLES, LEVEL, SEED = 1000, 0.95, 0
# The bootstrap scores fractions (GLUE metrics as harness.metrics returns them; SQuAD's per-example exact/F1
# columns are 0..1), while the table shows points (GLUE x100; SQuAD's row metrics are 0..100 already).
BOOTSTRAP_SCALE = 100.0


# ---- the paired bootstrap ----------------------------------------------------------------------------
def resampled_metric(metric: str, weights: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """`metric` on every resample at once. `weights[b, i]` is how often example i is in resample b.

    A per-example column named like the metric (SQuAD exact/F1) is averaged, since those metrics are means;
    a GLUE metric is harness.metrics' own, computed on every resample by `resampled_glue_metric`.
    """
    if metric in arrays:
        return weights @ arrays[metric].astype(np.float64) / weights.shape[1]
    return resampled_glue_metric(metric, arrays["prediction"], arrays["label"], weights)


def pairing_key(frames: Iterable[pd.DataFrame]) -> list[str]:
    """SQuAD predictions pair by question id; GLUE ones by (split, idx)."""
    frames = list(frames)
    if all("id" in f for f in frames):
        return ["id"]
    if all("split" in f for f in frames):
        return ["split", "idx"]
    return ["idx"]


def aligned(frames: Sequence[pd.DataFrame], key: list[str]) -> tuple[list[pd.DataFrame], int]:
    """Every frame restricted to the examples all of them scored, in one sorted order; and the union's size."""
    indexed = []
    for frame in frames:
        frame = frame.set_index(key)
        if frame.index.has_duplicates:
            raise ReportError(f"predictions have duplicate {'/'.join(key)} entries; pass one checkpoint "
                              "(the `best` predictions) and one split per frame")
        indexed.append(frame)
    common = indexed[0].index
    union = indexed[0].index
    for frame in indexed[1:]:
        common = common.intersection(frame.index)
        union = union.union(frame.index)
    common = common.sort_values()
    return [frame.loc[common].reset_index() for frame in indexed], len(union)


def paired_bootstrap(groups: Mapping[str, Sequence[pd.DataFrame]], metric: str, reference: str | None = None,
                     resamples: int = RESAMPLES, seed: int | Sequence[int] = SEED, level: float = LEVEL,
                     constants: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Which variants a paired bootstrap over evaluation examples cannot tell from the reference.

    `groups` maps a variant (a table row) to its per-seed prediction frames (columns label and prediction,
    or per-example metric columns for SQuAD; paired by split+idx or id). Each resample draws examples with
    replacement, once for all variants and seeds (that is the pairing); a variant's score on a resample is
    the median over its seeds, as in the table. A variant is `tied` with the reference when the `level`
    percentile interval of (reference - variant) contains 0. The reference defaults to the variant with the
    highest observed score. `constants` adds groups without predictions that score one fixed value on every
    resample (a constant prediction's correlation, undefined, counted as 0: the no-skill baseline of a
    regression task).

    Returns one row per group: observed score on the common examples, the interval of the difference,
    `p_at_least_as_good` (share of resamples where the variant scores >= the reference), `tied`, and the
    number of examples used out of those scored by any seed.
    """
    constants = dict(constants or {})
    names = list(groups)
    frames = [frame for name in names for frame in groups[name]]
    if not frames:
        raise ReportError("paired_bootstrap: no prediction frames given")
    if any(len(groups[name]) == 0 for name in names):
        raise ReportError(f"paired_bootstrap: no predictions for {[n for n in names if not groups[n]]}")
    key = pairing_key(frames)
    frames, union = aligned(frames, key)
    n = len(frames[0])
    if n == 0:
        raise ReportError("the prediction frames share no example (paired by " + "/".join(key) + "); they must "
                          "score the same evaluation set, e.g. data.max_eval_samples draws a subset per seed")
    columns = [c for c in ("label", "prediction", metric) if c in frames[0]]
    arrays = [{c: frame[c].to_numpy() for c in columns} for frame in frames]
    owners = np.repeat(np.arange(len(names)), [len(groups[name]) for name in names])
    predicted = len(names)

    def scores(weights: np.ndarray) -> np.ndarray:
        per_seed = np.stack([resampled_metric(metric, weights, a) for a in arrays])  # (seeds, b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: an undefined correlation stays NaN
            medians = [np.nanmedian(per_seed[owners == g], axis=0) for g in range(predicted)]
        return np.stack(medians + [np.full(len(weights), value, dtype=np.float64) for value in constants.values()],
                        axis=1)

    names += list(constants)
    observed = scores(np.ones((1, n)))[0]
    if reference is None:
        reference = names[int(np.nanargmax(observed))] if not np.isnan(observed).all() else names[0]
    ref = names.index(reference)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // n))
    parts = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        draws = rng.integers(0, n, size=(b, n))
        weights = np.bincount((draws + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        parts.append(scores(weights.astype(np.float64)))
    boot = np.concatenate(parts)  # (resamples, groups)
    diff = boot[:, [ref]] - boot
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(diff, [tail, 100 - tail], axis=0)
    valid = ~np.isnan(diff)
    share = np.where(valid.any(axis=0), ((diff <= 0) & valid).sum(axis=0) / np.maximum(valid.sum(axis=0), 1),
                     np.nan)
    return pd.DataFrame({
        "group": names, "observed": observed, "diff_low": low, "diff_high": high,
        "p_at_least_as_good": share,
        "tied": pd.array([None if np.isnan(lo) else bool(lo <= 0 <= hi) for lo, hi in zip(low, high)],
                         dtype="boolean"),
        "examples": n, "examples_any_seed": union, "reference": reference,
    }).set_index("group")
