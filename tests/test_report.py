"""The report: its numbers are the rows' medians, bold is the best, failures are listed, the bootstrap tells a
variant from a clearly worse one and not from itself, --check catches an edited table, the LaTeX is booktabs.

The rows are real: harness.run.run on the tiny model (2 tasks x lora r=4/8, full, head x 2 seeds, 2 steps
each) plus one failed run, built once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from harness import report
from harness.metrics import glue_metrics
from harness.run import run

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [("variant=lora", "variant.r=4"), ("variant=lora", "variant.r=8"), ("variant=full",), ("variant=head",)]
TASKS = ("rte", "stsb")
SEEDS = (0, 1)
BAD = ("task=rte", "variant=lora", "train.schedule=bogus")  # fails at training time: a `failed` row


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-results")


@pytest.fixture
def results_dir(make_cfg, results_root) -> Path:
    """<root>/report_test: 16 ok rows and 1 failed row, run once per module (run() skips ok rows anyway)."""
    sweep = results_root / "report_test"
    if not (sweep / ".complete").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread avoids contention with parallel jobs
        try:
            for task in TASKS:
                for variant in VARIANTS:
                    for seed in SEEDS:
                        cfg = make_cfg(f"task={task}", *variant, f"seed={seed}", "train.max_steps=2",
                                       "sweep_name=report_test", f"results_dir={results_root}")
                        assert run(cfg)["status"] == "ok"
            bad = run(make_cfg(*BAD, "sweep_name=report_test", f"results_dir={results_root}"))
            assert bad["status"] == "failed"
        finally:
            torch.set_num_threads(threads)
        (sweep / ".complete").touch()
    return sweep


@pytest.fixture
def written(results_dir, tmp_path) -> Path:
    """The text outputs of a fresh report of results_dir (no plots), in tmp_path/report."""
    return report.write_report([results_dir], tmp_path / "report", plots=False, resamples=200)


def raw_rows(folder: Path) -> pd.DataFrame:
    """The rows read straight from the Parquet files, independently of harness.results and the report."""
    return pd.DataFrame([pq.read_table(p).to_pylist()[0] for p in sorted((folder / "runs").glob("*.parquet"))])


# ---- the table ---------------------------------------------------------------------------------------
def test_cells_are_medians_and_stds_of_the_rows(results_dir):
    raw = raw_rows(results_dir)
    ok = raw[raw.status == "ok"]
    # two training steps leave the tiny model predicting one class: not what this test is about (see the
    # degenerate test below), so every column counts in Avg. here
    table = report.paper_table(report.load(results_dir).assign(degenerate=False), resamples=100)
    metric = {"rte": "metric_accuracy", "stsb": "metric_pearson"}
    label = {"rte": "RTE", "stsb": "STS-B"}
    assert len(table.groups) == len(VARIANTS)
    for (variant, rank, task), part in ok.groupby(["variant", ok["rank"].fillna(-1), "task"]):
        values = 100 * part[metric[task]].to_numpy(float)
        group = report.group_key(part.model.iloc[0], variant, None if rank == -1 else rank, "ours")
        cell = table.cell(group, label[task])
        assert cell.n_seeds == len(SEEDS)
        assert cell["median"] == pytest.approx(np.median(values), abs=1e-7)
        assert cell["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-7)
    for group in table.groups.group:
        average = table.cell(group, "Avg.")["median"]
        assert average == pytest.approx(np.mean([table.cell(group, label[t])["median"] for t in TASKS]))


def test_markdown_shows_each_median_and_bolds_the_best(results_dir, written):
    table = report.paper_table(report.load(results_dir), resamples=200)
    text = (written / "table.md").read_text()
    body = text.split("| Method")[1].split("\n\n")[0].splitlines()[2:]  # the table's rows, header and rule skipped
    lines = {line.split("|")[1].strip() + " " + line.split("|")[2].strip(): line for line in body}
    assert set(lines) == {"LoRA 4", "LoRA 8", "Full FT –", "Head only –"}
    for label in ("RTE", "STS-B", "Avg."):
        cells = table.cells[table.cells.column == label]
        assert cells.best.sum() >= 1
        assert (cells[cells.best]["median"] == cells["median"].max()).all()
        for cell in cells.itertuples():
            row = table.groups.set_index("group").loc[cell.group]
            name = f"{report.variant_label(row.variant)} {'–' if pd.isna(row['rank']) else int(row['rank'])}"
            shown = report.fixed(cell.median)
            expected = f"**{shown}**" if cell.best else shown
            assert expected in lines[name], (label, name, lines[name])


def test_failures_are_listed_not_tabulated(results_dir, written):
    raw = raw_rows(results_dir)
    failed = raw[raw.status == "failed"]
    assert len(failed) == 1
    key = failed.run_key.iloc[0]
    text = (written / "table.md").read_text()
    assert f"| {key} | failed | rte | lora |" in text
    assert "train.schedule='bogus'" in text
    failures = pd.read_csv(written / "failures.csv")
    assert failures.run_key.tolist() == [key]
    cells = pd.read_csv(written / "table.csv")
    assert cells.n_seeds.max() == len(SEEDS)  # the failed seed-0 lora r=8 RTE run added nothing


def test_latex_is_booktabs_with_one_cell_per_column(written):
    tex = (written / "table.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\caption{", r"\label{tab:results}"):
        assert rule in tex
    spec = tex.split(r"\begin{tabular}{")[1].split("}")[0]
    body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    header = tex.split("\\toprule\n")[1].split("\\midrule")[0].strip()
    assert all(line.count(" & ") + 1 == len(spec) for line in [header, *body])
    assert r"\textbf{" in tex and r"$_{\pm" in tex
    assert "Full FT" in tex and "_" not in tex.replace(r"\_", "").replace("$_{", "")


def test_holdout_rows_are_marked(results_dir):
    rows = report.load(results_dir).assign(degenerate=False)  # every column in Avg. (see the degenerate test)
    protocol = "holdout: train and evaluation sets both drawn from validation; NOT the standard split"
    rows.loc[rows.task == "rte", "protocol"] = protocol
    rows["holdout"] = rows.protocol.fillna("").str.startswith("holdout")
    text = report.markdown(report.results_grid(report.paper_table(rows, resamples=50)))
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert "RTE†" in header and "Avg.†" in header and "STS-B†" not in header
    assert f"† Non-standard protocol (data.protocol=holdout), not comparable with published dev-set scores: {protocol}" in text


def test_rows_mixing_two_configs_as_seeds_are_refused(results_dir):
    rows = report.load(results_dir)
    twin = rows[rows.status == "ok"].iloc[[0]].copy()
    config = json.loads(twin.config_json.iloc[0])
    config["train"]["lr"] = 0.123
    twin["config_json"] = json.dumps(config)
    twin["run_key"] = "0" * 16
    with pytest.raises(report.ReportError, match=r"differ in train\.lr"):
        report.paper_table(pd.concat([rows, twin], ignore_index=True))


def test_select_keeps_rank_free_baselines(results_dir):
    rows = report.select(report.load(results_dir), tasks=["rte"], ranks=[8])
    assert set(rows.task) == {"rte"}
    assert set(zip(rows.variant, rows["rank"].fillna(-1))) == {("lora", 8), ("full", -1), ("head", -1)}
    with pytest.raises(report.ReportError, match="variant .'dora'. not in these rows"):
        report.select(rows, variants=["dora"])


# ---- the bootstrap -----------------------------------------------------------------------------------
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


def test_pareto_front_counts_head_only_at_zero_parameters():
    params = np.array([0, 4_700, 73_700, 22_000_000, 331_800])
    scores = np.array([52.3, 52.0, 53.0, 50.0, 53.0])
    assert report.pareto_front(params, scores).tolist() == [0, 2]  # VeRA (below head-only) and QLoRA (tie) are off


def test_efficiency_compares_rows_on_the_tasks_they_share(results_dir):
    """Speed differs by task: a row measured on fewer slow tasks must not look faster for it."""
    rows = report.load(results_dir)
    rows = rows.assign(train_samples_per_s=np.where(rows.task == "rte", 100.0, 10.0))
    lora4 = (rows.variant == "lora") & (rows["rank"] == 4)
    frame = report.efficiency_frame(rows[~(lora4 & (rows.task == "stsb"))]).set_index("group")
    assert (frame.train_samples_per_s == 100.0).all() and set(frame.tasks) == {"rte"}
    assert report.efficiency_frame(rows).train_samples_per_s.eq(55.0).all()  # every row has both: the median


def test_dylora_rank_curve_is_read_at_the_best_evaluation(tmp_path):
    """The table scores each run at its best evaluation; the rank curve must show the same evaluation."""
    pd.DataFrame({"step": [10, 10, 10, 20, 20, 20], "setting": [None, "r=1", "r=8", None, "r=1", "r=8"],
                  "score": [0.8, 0.6, 0.8, 0.5, 0.3, 0.5]}).to_parquet(tmp_path / "history.parquet")
    rows = pd.DataFrame([{"status": "ok", "group": "dylora r=8", "task": "rte", "seed": 0, "best_step": 10,
                          "artifacts": str(tmp_path), "config_json": "{}",
                          "rank_scores_json": json.dumps({"r=1": 0.3, "r=8": 0.5})}])  # the last evaluation's
    curve = report.rank_scores(rows).set_index("rank")
    assert curve.score.to_dict() == {1: 0.6, 8: 0.8}


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


def test_resampled_metrics_equal_harness_metrics_on_each_resample():
    rng = np.random.default_rng(5)
    n = 60
    cases = {"accuracy": (rng.integers(0, 3, n), rng.integers(0, 3, n)), "mcc": (rng.integers(0, 3, n),
             rng.integers(0, 3, n)), "f1": (rng.integers(0, 2, n), rng.integers(0, 2, n)),
             "pearson": (rng.normal(size=n), rng.normal(size=n)),
             "spearman": (rng.integers(0, 5, n).astype(float), rng.normal(size=n).round(1))}
    draws = rng.integers(0, n, size=(25, n))
    weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)
    for metric, (prediction, label) in cases.items():
        arrays = {"prediction": prediction, "label": label}
        fast = report.resampled_metric(metric, weights, draws, arrays)
        slow = [glue_metrics([metric], prediction[d], label[d])[metric] for d in draws]
        np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12, err_msg=metric)


# ---- outputs, --check, errors ------------------------------------------------------------------------
def test_check_passes_on_fresh_output_and_fails_after_an_edit(results_dir, written, capsys):
    args = [str(results_dir), "--out", str(written), "--resamples", "200"]
    assert report.main([*args, "--check"]) == 0
    table = written / "table.md"
    table.write_text(table.read_text().replace("Full FT", "Full fine-tuning", 1))
    assert report.main([*args, "--check"]) == 1
    out = capsys.readouterr().out
    assert "table.md differs" in out and "-| Full fine-tuning" in out and "+| Full FT" in out
    (written / "table.md").unlink()
    assert report.main([*args, "--check"]) == 1
    assert "table.md missing" in capsys.readouterr().out


def test_outputs_and_plots_are_written(results_dir, tmp_path):
    out = report.write_report([results_dir], tmp_path / "report", resamples=100)
    for name in ("table", "efficiency", "param_counts"):
        for suffix in (".md", ".tex"):
            assert (out / f"{name}{suffix}").stat().st_size > 0
    for name in ("score_vs_rank", "score_vs_params", "efficiency", "training_curves"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (out / "plots" / f"{name}.svg").read_bytes()[:2000]
        assert f"](plots/{name}.png)" in (out / "README.md").read_text()
    assert not (out / "plots" / "rank_curve.png").exists()  # no DyLoRA rows here
    efficiency = pd.read_csv(out / "efficiency.csv")
    assert (efficiency.train_samples_per_s > 0).all() and (efficiency.account_bytes > 0).all()


def test_empty_results_folder_says_how_to_fix_it(tmp_path, capsys):
    with pytest.raises(report.ReportError, match=r"no results rows under .*python -m harness \+sweep=smoke"):
        report.load(tmp_path)
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(report.ReportError, match="--out"):
        report.write_report([tmp_path, tmp_path])


def test_param_counts_are_computed_and_match_the_lora_paper():
    frame = report.param_count_frame(["lora"]).set_index("model")
    assert frame.loc["roberta_base", "ours"] == 294_912  # LoRA paper: 0.3M (r=8 on W_q, W_v)
    assert frame.loc["roberta_large", "ours"] == 786_432  # 0.8M
    assert frame.loc["roberta_base", "published"] == "0.3M"
    assert 0.95 < frame.loc["roberta_base", "ratio"] < 1.05
    vera = report.param_count_frame(["vera"]).set_index("model")
    assert vera.loc["roberta_base", "ours"] == 43_008 and vera.loc["roberta_base", "published"] == "0.043M"
    assert vera.loc["roberta_large", "ours"] == 61_440 and vera.loc["roberta_large", "published"] == "0.061M"


def test_readme_shows_the_committed_table():
    """The README pastes results/cpu_glue/report/table.md: a regenerated table must be pasted again."""
    table = REPO / "results" / "cpu_glue" / "report" / "table.md"
    if not table.exists():
        pytest.skip("no committed cpu_glue report")
    assert table.read_text().strip() in (REPO / "README.md").read_text(), (
        "README.md's results table differs from results/cpu_glue/report/table.md: paste the new table.md into "
        "the README's report section")


# ---- the notebook ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_notebook_runs_headless(results_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = REPO / "notebooks" / "compare_variants.ipynb"
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("HARNESS_REPORT_DIRS", str(results_dir))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("Full FT" in o.get("data", {}).get("text/markdown", "") for o in outputs)


# ---- selection and degenerate runs (issue 14) -------------------------------------------------------
def test_selection_switch_scores_every_run_at_the_last_evaluation_and_says_so(results_dir):
    rows = report.load(results_dir)
    last = report.apply_selection(rows, "last")
    ok = last[last.status == "ok"]
    for row in ok.itertuples():
        recorded = json.loads(row.last_metrics_json)
        assert row.metric_accuracy == recorded.get("accuracy") or pd.isna(row.metric_accuracy)
        assert row.score_best == row.score_last
    table = report.paper_table(last, resamples=50)
    assert table.selection == "last"
    assert "--selection last" in report.markdown(report.results_grid(table))
    best = report.results_grid(report.paper_table(report.apply_selection(rows), resamples=50))
    assert "eval_best" in best.caption
    with pytest.raises(report.ReportError, match="--selection"):
        report.apply_selection(rows, "best")


def test_degenerate_runs_are_marked_counted_and_an_all_degenerate_column_is_left_out_of_the_average(results_dir):
    rows = report.apply_selection(report.load(results_dir))
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


def test_inflation_table_is_best_minus_last_in_points(results_dir):
    rows = report.load(results_dir)
    text = report.inflation_table(rows)
    ok = rows[rows.status == "ok"]
    lora4 = ok[(ok.variant == "lora") & (ok["rank"] == 4) & (ok.task == "rte")]
    expected = ((lora4.score_best - lora4.score_last) * 100).median()
    line = next(l for l in text.splitlines() if l.startswith("| LoRA | 4 |"))
    assert line.split("|")[3].strip() == f"{expected:.1f}"  # columns: method, r, RTE, STS-B
