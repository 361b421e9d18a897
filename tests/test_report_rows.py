"""Report rows: loading says how to fix an empty folder, select keeps the baselines, two configs are never
mixed as seeds (same seed or not), DyLoRA's rank curve is read at the table's evaluation, and a selection whose
evaluation is missing is an error, never the eval_best number under its name."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import report


def test_rows_mixing_two_configs_as_seeds_are_refused(report_rows_dir):
    rows = report.load(report_rows_dir)
    twin = rows[rows.status == "ok"].iloc[[0]].copy()
    config = json.loads(twin.config_json.iloc[0])
    config["train"]["lr"] = 0.123
    twin["config_json"] = json.dumps(config)
    twin["run_key"] = "0" * 16
    with pytest.raises(report.ReportError, match=r"differ in train\.lr"):
        report.paper_table(pd.concat([rows, twin], ignore_index=True))


def test_seeds_of_one_cell_run_under_two_configs_are_refused(report_rows_dir):
    """The sweep file changed between sittings (seed 1 ran at another lr), or precision=auto computed bf16 for one
    seed and fp32 for another: no two rows share a seed, and the cell must still not pass for one method."""
    rows = report.load(report_rows_dir)
    cell = rows[(rows.status == "ok") & (rows.variant == "lora") & (rows["rank"] == 8) & (rows.task == "rte")]
    assert len(set(cell.seed)) == 2
    report.paper_table(rows)
    other_lr = rows.copy()
    config = json.loads(other_lr.at[cell.index[1], "config_json"])
    config["train"]["lr"] = 0.123
    other_lr.at[cell.index[1], "config_json"] = json.dumps(config)
    with pytest.raises(report.ReportError, match=r"lora r=8 on rte \(seeds 0, 1\) differ in train\.lr"):
        report.paper_table(other_lr)
    other_precision = rows.copy()
    other_precision.at[cell.index[1], "precision"] = "bf16"
    with pytest.raises(report.ReportError, match=r"differ in precision as computed \(bf16, fp32\)"):
        report.paper_table(other_precision)


def test_seeds_that_loaded_other_model_files_are_refused(report_rows_dir):
    """One local model path, its weights replaced between two seeds' runs (the run_key names the path): the rows'
    model fingerprints differ, and the cell is refused; rows from before the column recorded none and pass."""
    rows = report.load(report_rows_dir)
    cell = rows[(rows.status == "ok") & (rows.variant == "lora") & (rows["rank"] == 8) & (rows.task == "rte")]
    loaded = rows.copy()
    loaded.loc[cell.index, "model_fingerprint"] = "aaaa"
    loaded.at[cell.index[1], "model_fingerprint"] = None
    report.paper_table(loaded)
    loaded.at[cell.index[1], "model_fingerprint"] = "bbbb"
    with pytest.raises(report.ReportError, match=r"lora r=8 on rte .* differ in model files \(aaaa, bbbb\)"):
        report.paper_table(loaded)


def test_seeds_whose_auto_settings_were_settled_differently_are_refused(report_rows_dir):
    """QLoRA's backend=auto and compute_dtype=auto are settled per machine and recorded only in extra_json (the
    run_key holds `auto`): a sweep resumed on a machine without bf16 must not pool its seeds with the others."""
    rows = report.load(report_rows_dir)
    cell = rows[(rows.status == "ok") & (rows.variant == "lora") & (rows["rank"] == 8) & (rows.task == "rte")]
    facts = {"quant": "nf4", "quant_backend": "torchao", "compute_dtype": "bf16"}
    settled = rows.copy()
    settled.loc[cell.index, "extra_json"] = json.dumps(facts)
    report.paper_table(settled)
    settled.at[cell.index[1], "extra_json"] = json.dumps({**facts, "compute_dtype": "fp32"})
    with pytest.raises(report.ReportError, match=r"lora r=8 on rte .* differ in what was assembled \(compute_dtype\)"):
        report.paper_table(settled)
    older = {k: v for k, v in facts.items() if k != "compute_dtype"}  # a row from before the fact was recorded
    settled.at[cell.index[1], "extra_json"] = json.dumps(older)
    with pytest.raises(report.ReportError, match=r"\(compute_dtype, unrecorded in some rows\)"):
        report.paper_table(settled)


def test_seeds_warm_started_from_sources_of_different_tasks_are_refused(report_rows_dir):
    """init_from holds only the source's run_key, so the cell's own configs agree: the sources' must too."""
    rows = report.load(report_rows_dir)
    ok = rows[rows.status == "ok"]
    cell = ok[(ok.variant == "lora") & (ok["rank"] == 8) & (ok.task == "rte")].sort_values("seed")
    lora_sources = ok[(ok.variant == "lora") & (ok["rank"] == 8) & (ok.task != "rte")].sort_values("seed")
    assert len(cell) == len(lora_sources) == 2
    warm = rows.copy()
    warm["init_from"] = None
    warm.loc[cell.index, "init_from"] = lora_sources.run_key.tolist()
    report.paper_table(warm)  # one source task, its two seeds: a cell
    head_on_rte = ok[(ok.variant == "head") & (ok.task == "rte")].seed.idxmax()  # another task and method
    warm.at[cell.index[1], "init_from"] = rows.at[head_on_rte, "run_key"]
    with pytest.raises(report.ReportError,
                       match=r"lora r=8 on rte .* differ in their warm-start sources' .*task\.name"):
        report.paper_table(warm)


def test_a_selection_whose_evaluation_is_missing_is_an_error(report_rows_dir, tmp_path):
    """A row's metric columns are eval_best's: where neither last_metrics_json nor the history holds the last
    evaluation, --selection last must say so, not show the best evaluation's numbers as the last."""
    rows = report.load(report_rows_dir)
    first = rows.index[rows.status == "ok"][0]
    rows.at[first, "last_metrics_json"] = None  # an older row: the history has it
    history = pd.read_parquet(f"{rows.at[first, 'artifacts']}/history.parquet")
    last = history[history.step == history.step.max()].iloc[0]
    rows.at[first, "metric_accuracy"] = -1.0  # not the last evaluation's: the history's must replace it
    at_last = report.apply_selection(rows, "last").loc[first]
    assert (at_last.metric_accuracy, at_last.best_step) == (last.accuracy, last.step)
    rows.at[first, "artifacts"] = str(tmp_path)  # and its folder is gone
    with pytest.raises(report.ReportError, match="--selection last needs its last evaluation"):
        report.apply_selection(rows, "last")


def test_select_keeps_rank_free_baselines(report_rows_dir):
    rows = report.select(report.load(report_rows_dir), tasks=["rte"], ranks=[8])
    assert set(rows.task) == {"rte"}
    assert set(zip(rows.variant, rows["rank"].fillna(-1))) == {("lora", 8), ("full", -1), ("head", -1)}
    with pytest.raises(report.ReportError, match="variant .'dora'. not in these rows"):
        report.select(rows, variants=["dora"])


def test_dylora_rank_curve_is_read_at_the_tables_evaluation(tmp_path):
    """The table scores each run at its best evaluation (or, under --selection, the one apply_selection moves
    best_step to); the rank curve must show the same evaluation."""
    pd.DataFrame({"step": [10, 10, 10, 20, 20, 20], "setting": [None, "r=1", "r=8", None, "r=1", "r=8"],
                  "score": [0.8, 0.6, 0.8, 0.5, 0.3, 0.5]}).to_parquet(tmp_path / "history.parquet")
    rows = pd.DataFrame([{"status": "ok", "group": "dylora r=8", "task": "rte", "seed": 0, "best_step": 10,
                          "artifacts": str(tmp_path), "config_json": "{}",
                          "rank_scores_json": json.dumps({"r=1": 0.3, "r=8": 0.5})}])  # the last evaluation's
    curve = report.rank_scores(rows).set_index("rank")
    assert curve.score.to_dict() == {1: 0.6, 8: 0.8}
    heldout = rows.assign(selection="heldout", selected_step=20, score_selected=0.5, run_key="k" * 16)
    curve = report.rank_scores(report.apply_selection(heldout, "heldout")).set_index("rank")
    assert curve.score.to_dict() == {1: 0.3, 8: 0.5}  # the table's evaluation under --selection heldout


# ---- which evaluation a table reports (issue 14) -----------------------------------------------------
def test_selection_switch_scores_every_run_at_the_last_evaluation_and_says_so(report_rows_dir):
    rows = report.load(report_rows_dir)
    last = report.apply_selection(rows, "last")
    ok = last[last.status == "ok"]
    for row in ok.itertuples():
        recorded = json.loads(row.last_metrics_json)
        assert row.metric_accuracy == recorded.get("accuracy") or pd.isna(row.metric_accuracy)
        assert row.score_best == row.score_last
        assert row.best_step == recorded["step"]  # where DyLoRA's rank curve is read
    table = report.paper_table(last, resamples=50)
    assert table.selection == "last"
    assert "--selection last" in report.markdown(report.results_grid(table))
    best = report.results_grid(report.paper_table(report.apply_selection(rows), resamples=50))
    assert "eval_best" in best.caption
    with pytest.raises(report.ReportError, match="--selection"):
        report.apply_selection(rows, "best")
