"""The report's numbers: cells are the rows' medians, efficiency compares rows on shared tasks, parameter
counts match the papers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from harness import report

# the report_rows_dir fixture (tests/conftest.py): 4 settings (LoRA r=4 and r=8, full, head), 2 tasks, 2 seeds
SETTINGS, TASKS, SEEDS = 4, ("rte", "stsb"), 2


def raw_rows(folder: Path) -> pd.DataFrame:
    """The rows read straight from the Parquet files, independently of harness.rows and the report."""
    return pd.DataFrame([pq.read_table(p).to_pylist()[0] for p in sorted((folder / "runs").glob("*.parquet"))])


def test_cells_are_medians_and_stds_of_the_rows(report_rows_dir):
    raw = raw_rows(report_rows_dir)
    ok = raw[raw.status == "ok"]
    # two training steps leave the tiny model predicting one class: not what this test is about (see the
    # degenerate test below), so every column counts in Avg. here
    table = report.paper_table(report.load(report_rows_dir).assign(degenerate=False), resamples=100)
    metric = {"rte": "metric_accuracy", "stsb": "metric_pearson"}
    label = {"rte": "RTE", "stsb": "STS-B"}
    assert len(table.groups) == SETTINGS
    for (variant, rank, task), part in ok.groupby(["variant", ok["rank"].fillna(-1), "task"]):
        values = 100 * part[metric[task]].to_numpy(float)
        group = report.group_key(part.model.iloc[0], variant, None if rank == -1 else rank, "ours")
        cell = table.cell(group, label[task])
        assert cell.n_seeds == SEEDS
        assert cell["median"] == pytest.approx(np.median(values), abs=1e-7)
        assert cell["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-7)
    for group in table.groups.group:
        average = table.cell(group, "Avg.")["median"]
        assert average == pytest.approx(np.mean([table.cell(group, label[t])["median"] for t in TASKS]))


def test_efficiency_compares_rows_on_the_tasks_they_share(report_rows_dir):
    """Speed differs by task: a row measured on fewer slow tasks must not look faster for it."""
    rows = report.load(report_rows_dir)
    rows = rows.assign(train_samples_per_s=np.where(rows.task == "rte", 100.0, 10.0))
    lora4 = (rows.variant == "lora") & (rows["rank"] == 4)
    frame = report.efficiency_frame(rows[~(lora4 & (rows.task == "stsb"))]).set_index("group")
    assert (frame.train_samples_per_s == 100.0).all() and set(frame.tasks) == {"rte"}
    assert report.efficiency_frame(rows).train_samples_per_s.eq(55.0).all()  # every row has both: the median


def inspected_counts(model: str, variant: str, overrides: tuple[str, ...]) -> dict:
    """harness.inspect's counts for `variant` on a random-init `model` with RTE's head (no weights downloaded).

    Built on the meta device (shapes only: the same counts, roberta-large in 0.1 s instead of 5 s); a variant
    that cannot be built there (it draws random tensors with a CPU generator) is built for real.
    """
    from harness.inspect import compose_config, inspect

    cfg = compose_config([f"model={model}", "model.init=random", "task=rte", f"variant={variant}", *overrides])
    try:
        with torch.device("meta"):
            return inspect(cfg)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return inspect(cfg)


def test_committed_param_counts_are_what_harness_inspect_counts():
    """The report reads our counts from published_params.csv instead of building roberta-large: they must be
    harness.inspect's, for every registered variant listed, and close to the papers' (LoRA 0.3M/0.8M, ...)."""
    from harness.adapters import VARIANTS

    committed = report.published_params()
    assert set(committed.variant) <= set(VARIANTS) and {"lora", "vera", "full"} <= set(committed.variant)
    for entry in committed.itertuples():
        found = inspected_counts(entry.model, entry.variant, tuple(entry.overrides.split()))
        counted = found["trainable_params" if entry.counted == "whole model" else "trainable_params_no_head"]
        assert (entry.ours, entry.head_params) == (counted, found["head_params"]), (entry.variant, entry.model)
    frame = report.param_count_frame(["lora", "vera"]).set_index(["variant", "model"])
    assert frame.loc[("lora", "roberta_base"), "ours"] == 294_912  # LoRA paper: 0.3M (r=8 on W_q, W_v)
    assert frame.loc[("lora", "roberta_large"), "published"] == "0.8M"
    assert frame.loc[("vera", "roberta_base"), "ours"] == 43_008  # VeRA paper: 0.043M
    assert ((frame.ratio > 0.97) & (frame.ratio < 1.03)).all()


def test_a_misprinted_published_count_says_what_is_wrong():
    assert report.tables.parse_count("73.7K") == 73_700 and report.tables.parse_count("0.3M") == 300_000
    with pytest.raises(report.ReportError, match="'0.3m' .* K/M/B suffix"):
        report.tables.parse_count("0.3m")


def test_efficiency_table_shows_wall_and_setup_seconds_where_rows_have_them(report_rows_dir):
    rows = report.load(report_rows_dir)
    assert rows.wall_seconds.notna().all()  # written by this checkout's runs
    grid = report.efficiency_grid(report.efficiency_frame(rows))
    assert "Wall s" in [cell.text for cell in grid.header] and "Setup s" in [cell.text for cell in grid.header]
    assert any("in Wall s alone" in note and "DyLoRA" not in note for note in grid.notes)  # what Wall s holds
    with_dylora = report.efficiency_frame(rows).assign(variant=lambda f: f.variant.replace("full", "dylora"))
    assert any("DyLoRA evaluates at each rank" in note for note in report.efficiency_grid(with_dylora).notes)
    old = rows.assign(wall_seconds=np.nan, setup_seconds=np.nan)  # rows from before the columns existed
    grid = report.efficiency_grid(report.efficiency_frame(old))
    assert "Wall s" not in [cell.text for cell in grid.header] and not any("Wall s" in n for n in grid.notes)


# ---- degenerate runs and eval_best's inflation (issue 14) --------------------------------------------
def test_degenerate_runs_are_marked_counted_and_an_all_degenerate_column_is_left_out_of_the_average(report_rows_dir):
    rows = report.apply_selection(report.load(report_rows_dir))
    for row in rows[rows.status == "ok"].itertuples():  # recomputed from the saved predictions
        predictions = report.read_predictions(row.artifacts, "best")
        assert row.degenerate == (predictions.prediction.nunique() == 1)
    forced = rows.copy()
    forced.loc[forced.task == "rte", "degenerate"] = True
    forced.loc[forced.task != "rte", "degenerate"] = False
    table = report.paper_table(forced, resamples=50)
    assert table.degenerate_runs == int((forced[forced.status == "ok"].task == "rte").sum())
    text = report.markdown(report.results_grid(table))
    assert "°" in text and f"° {table.degenerate_runs} run(s)" in text and "Greyed out" in text
    assert 'color:gray' in text
    averages = table.cells[table.cells.column == "Avg."]
    stsb = table.cells[table.cells.column == "STS-B"].set_index("group")["median"]
    for cell in averages.itertuples():  # the average is STS-B alone once RTE is all degenerate
        assert cell.median == pytest.approx(stsb[cell.group])


def test_inflation_table_is_best_minus_last_in_points(report_rows_dir):
    rows = report.load(report_rows_dir)
    text = report.inflation_table(rows)
    ok = rows[rows.status == "ok"]
    lora4 = ok[(ok.variant == "lora") & (ok["rank"] == 4) & (ok.task == "rte")]
    expected = ((lora4.score_best - lora4.score_last) * 100).median()
    line = next(l for l in text.splitlines() if l.startswith("| LoRA | 4 |"))
    assert line.split("|")[3].strip() == f"{expected:.1f}"  # columns: method, r, RTE, STS-B


def test_warm_and_cold_runs_of_one_method_get_a_row_each(make_cfg, tmp_path):
    """LoRA's RTE from its MNLI run (one sweep) beside LoRA's RTE without it (another sweep): one report shows
    the warm cells with ‡ and the cold runs as "LoRA (no warm start)", never mixed into one cell as seeds; the
    efficiency table keeps one row per method."""
    from harness.run import run

    def results(sweep, *overrides):
        row = run(make_cfg(*overrides, "train.max_steps=2", f"sweep_name={sweep}"))
        assert row["status"] == "ok", row.get("error")

    for seed in (0, 1):
        results("warm", "task=mnli", "data.protocol=holdout", f"seed={seed}")
        results("warm", "task=rte", "init_from=mnli", f"seed={seed}")
        results("cold", "task=rte", f"seed={seed}")
    folder = tmp_path / "results"
    rows = report.load(folder / "warm", folder / "cold")
    table = report.paper_table(rows, resamples=50)
    assert table.groups.group.str.endswith("|no warm start").sum() == 1
    warm_group, cold_group = table.groups.group
    assert table.cell(warm_group, "RTE").warm and table.cell(warm_group, "RTE").n_seeds == 2
    assert not table.cell(warm_group, "MNLI-m").warm
    assert not table.cell(cold_group, "RTE").warm and table.cell(cold_group, "RTE").n_seeds == 2
    assert table.cell(cold_group, "MNLI-m") is None
    text = report.markdown(report.results_grid(table))
    assert "| LoRA (no warm start) | 8 |" in text and "‡ Warm start" in text
    assert [line.count("‡") for line in text.splitlines() if line.startswith("| LoRA")] == [1, 0]
    assert len(report.efficiency_frame(rows)) == 1
    # one sweep alone: no split, no extra row
    assert len(report.paper_table(report.load(folder / "cold"), resamples=50).groups) == 1
