"""The report's plots: the Pareto front."""

from __future__ import annotations

import numpy as np

from harness import report


def test_pareto_front_counts_head_only_at_zero_parameters():
    params = np.array([0, 4_700, 73_700, 22_000_000, 331_800])
    scores = np.array([52.3, 52.0, 53.0, 50.0, 53.0])
    assert report.pareto_front(params, scores).tolist() == [0, 2]  # VeRA (below head-only) and QLoRA (tie) are off
