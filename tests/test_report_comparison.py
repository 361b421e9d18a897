"""Each method against LoRA (the paired difference and its interval) and the first-evaluation table, on real rows
of the tiny model (the report_rows_dir fixture: LoRA r=4 and r=8, full, head; RTE and STS-B; 2 seeds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

from harness import report
from harness.report.comparison import (MAJORITY, against_reference, comparison_grid, first_evaluation_grid,
                                       first_evaluations)
from harness.report.rows import read_predictions


@pytest.fixture
def table_and_rows(report_rows_dir):
    rows = report.apply_selection(report.load(report_rows_dir))
    return report.paper_table(rows, resamples=200), rows


def test_each_row_minus_lora_with_an_interval_that_holds_it(table_and_rows):
    table, rows = table_and_rows
    comparison = against_reference(table, rows)
    lora_r4 = report.group_key(rows.model.iloc[0], "lora", 4, "ours")
    assert set(comparison.references.values()) == {lora_r4}  # both LoRA rows have 4 runs: the lower rank
    cells = comparison.cells[comparison.cells.group != MAJORITY]
    assert set(cells.group) == set(table.groups.group) - {lora_r4} and set(cells.column) == {"RTE", "STS-B"}
    for cell in cells.itertuples():
        expected = table.cell(cell.group, cell.column)["median"] - table.cell(lora_r4, cell.column)["median"]
        assert cell.diff == pytest.approx(expected, abs=1e-3)
        assert cell.significant == (not cell.diff_low <= 0 <= cell.diff_high)
    text = report.markdown(comparison_grid(comparison))
    assert "Each method against LoRA r=4" in text
    # header + the other rows + the majority-class row
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(table.groups) - 1 + 1


def test_lora_against_the_majority_class(table_and_rows):
    """RTE: the most frequent validation label predicted everywhere, scored by scikit-learn; STS-B: a constant's
    correlation counts as 0. The interval is LoRA's own paired bootstrap against that baseline."""
    table, rows = table_and_rows
    comparison = against_reference(table, rows)
    lora_r4 = report.group_key(rows.model.iloc[0], "lora", 4, "ours")
    baseline = comparison.cells[comparison.cells.group == MAJORITY].set_index("column")
    assert set(baseline.index) == {"RTE", "STS-B"} and set(baseline.reference) == {lora_r4}
    runs = rows[(rows.group == lora_r4) & (rows.task == "rte")]
    labels = read_predictions(runs.artifacts.iloc[0]).label.to_numpy()
    majority = np.bincount(labels).argmax()
    assert baseline.at["RTE", "score"] == pytest.approx(
        100 * accuracy_score(labels, np.full_like(labels, majority)), abs=1e-3)
    for column in ("RTE", "STS-B"):
        line = baseline.loc[column]
        lora = table.cell(lora_r4, column)["median"]
        assert line["diff"] == pytest.approx(line.score - lora, abs=1e-3)
        assert line.significant == (not line.diff_low <= 0 <= line.diff_high)
    assert baseline.at["STS-B", "score"] == 0.0
    text = report.markdown(comparison_grid(comparison))
    assert "| Majority class | – | – |" in text and f"RTE {baseline.at['RTE', 'score']:.1f}" in text


def test_no_lora_row_no_comparison(report_rows_dir):
    rows = report.apply_selection(report.select(report.load(report_rows_dir), variants=["full", "head"]))
    assert against_reference(report.paper_table(rows, resamples=50), rows) is None


def test_first_evaluation_is_each_runs_first_history_entry(table_and_rows):
    table, rows = table_and_rows
    frame = first_evaluations(table, rows)
    ok = rows[rows.status == "ok"]
    assert len(frame) == len(table.groups) * 2
    for cell in frame.itertuples():
        runs = ok[(ok.group == cell.group) & (ok.task == cell.task)]
        firsts = [pd.read_parquet(f"{a}/history.parquet").sort_values("step").score.iloc[0] * 100
                  for a in runs.artifacts]
        assert cell.n_seeds == len(firsts) == 2
        assert cell.median == pytest.approx(pd.Series(firsts).median(), abs=1e-6)
        assert cell.final == table.cell(cell.group, cell.column)["median"]
    assert "first evaluation" in report.markdown(first_evaluation_grid(table, frame))
