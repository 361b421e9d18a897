"""The paired bootstrap tells a variant from a clearly worse one and not from itself, and its resampled
metrics equal harness.metrics on every resample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness import report
from harness.metrics import glue_metrics


def classification_frames(correct_share: float, seeds: int, n: int = 400, first_seed: int = 0):
    """Per-seed predictions of one variant on the same 0/1 labels, right on about `correct_share` of them."""
    labels = np.random.default_rng(0).integers(0, 2, n)
    frames = []
    for seed in range(first_seed, first_seed + seeds):
        wrong = np.random.default_rng(seed + 10).random(n) > correct_share
        frames.append(pd.DataFrame({"split": "validation", "idx": np.arange(n), "label": labels,
                                    "prediction": np.where(wrong, 1 - labels, labels)}))
    return frames


@pytest.mark.parametrize("metric", ["accuracy", "f1", "mcc"])
def test_bootstrap_ties_a_variant_with_itself_and_separates_a_worse_one(metric):
    good = classification_frames(0.9, seeds=3)
    worse = classification_frames(0.6, seeds=2)
    # the same predictions shuffled in row order: pairing is by split+idx, not by position
    twin = [frame.sample(frac=1, random_state=1) for frame in good]
    test = report.paired_bootstrap({"good": good, "twin": twin, "worse": worse}, metric, resamples=500)
    assert test.loc["good", "reference"] == "good"
    assert bool(test.loc["good", "tied"]) and bool(test.loc["twin", "tied"])
    assert test.loc["twin", "diff_low"] == 0 == test.loc["twin", "diff_high"]
    assert not bool(test.loc["worse", "tied"])
    assert test.loc["worse", "p_at_least_as_good"] < 0.025
    expected = np.median([glue_metrics([metric], f.prediction.to_numpy(), f.label.to_numpy())[metric] for f in good])
    assert test.loc["good", "observed"] == pytest.approx(expected)


def test_bootstrap_ties_two_equally_good_variants():
    a = classification_frames(0.8, seeds=2)
    b = classification_frames(0.8, seeds=2, first_seed=5)  # as good, with other mistakes
    test = report.paired_bootstrap({"a": a, "b": b}, "accuracy", resamples=500)
    assert test.tied.all()


def test_bootstrap_does_not_call_a_significantly_better_row_tied():
    """The reference is chosen elsewhere (the table's medians); a row clearly above it is not 'indistinguishable'."""
    test = report.paired_bootstrap({"worse": classification_frames(0.6, seeds=2),
                                    "good": classification_frames(0.9, seeds=2)}, "accuracy", reference="worse",
                                   resamples=500)
    assert test.loc["good", "diff_high"] < 0 and not bool(test.loc["good", "tied"])


def test_bootstrap_regression_and_squad():
    rng = np.random.default_rng(3)
    label = rng.uniform(0, 5, 300)
    frame = lambda prediction: pd.DataFrame({"split": "validation", "idx": np.arange(300),  # noqa: E731
                                             "label": label, "prediction": prediction})
    good = [frame(label + rng.normal(0, 0.3, 300)) for _ in range(2)]
    noise = [frame(rng.normal(0, 1, 300)) for _ in range(2)]
    for metric in ("pearson", "spearman"):
        test = report.paired_bootstrap({"good": good, "noise": noise}, metric, resamples=300)
        assert bool(test.loc["good", "tied"]) and not bool(test.loc["noise", "tied"])
    # SQuAD: per-example exact/F1 are averaged (those metrics are means), pairing by question id
    ids = [f"q{i}" for i in range(200)]
    strong = pd.DataFrame({"id": ids, "f1": rng.uniform(60, 100, 200), "exact": 100.0})
    weak = pd.DataFrame({"id": ids[::-1], "f1": rng.uniform(0, 40, 200), "exact": 0.0})
    test = report.paired_bootstrap({"strong": [strong], "weak": [weak]}, "f1", resamples=300)
    assert test.loc["strong", "observed"] == pytest.approx(strong.f1.mean())
    assert not bool(test.loc["weak", "tied"])


def test_a_constant_group_scores_its_value_on_every_resample():
    """`constants` (the correlation baseline): a group without predictions that scores its value on every resample,
    beside the variant's own scores (unchanged by it); a strong correlation is told from 0, one near 0 is not."""
    rng = np.random.default_rng(5)
    label = rng.uniform(0, 5, 300)
    frame = lambda prediction: pd.DataFrame({"split": "validation", "idx": np.arange(300),  # noqa: E731
                                             "label": label, "prediction": prediction})
    strong, noise = [frame(label + rng.normal(0, 1, 300))], [frame(rng.normal(0, 1, 300))]
    solo = report.paired_bootstrap({"strong": strong, "noise": noise}, "pearson", "strong", resamples=400)
    test = report.paired_bootstrap({"strong": strong}, "pearson", "strong", resamples=400,
                                   constants={"zero": 0.0})
    assert test.loc["zero", "observed"] == 0.0 and test.loc["zero", "examples"] == 300
    assert not bool(test.loc["zero", "tied"]) and test.loc["zero", "diff_low"] > 0.5
    assert test.loc["strong", "observed"] == pytest.approx(solo.loc["strong", "observed"])
    against_noise = report.paired_bootstrap({"noise": noise}, "pearson", "noise", resamples=400,
                                            constants={"zero": 0.0})
    assert bool(against_noise.loc["zero", "tied"])
    assert test.loc["zero", "p_at_least_as_good"] == 0.0
