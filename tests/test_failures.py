"""What becomes a row and what becomes an error (docs/failures.md): no wrong number is ever recorded `ok`."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import rows, run_keys, sweep
from harness.atomic import atomic_write_parquet
from harness.errors import ConfigError, DataError, Diverged
from harness.run import run
from harness.train import TrainOutcome

from conftest import CONF_DIR, REPO

CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HARNESS_THREADS": "1"}


def copy_of_data(tiny_data_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(tiny_data_dir, target)
    return target


def edit_split(data_dir, task: str, split: str, edit) -> None:
    path = data_dir / "glue" / task / f"{split}.parquet"
    frame = pd.read_parquet(path)
    edit(frame).to_parquet(path, index=False)


# ---- 1. non-finite results ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_a_run_that_diverges_on_its_last_step_is_recorded_diverged_not_ok(make_cfg, task):
    """lr=1e4 with no warmup: the 4th (last) step makes the weights NaN, and no further loss is computed. RTE's
    argmax over NaN logits is class 0 (a plausible accuracy); STS-B's pearson is NaN."""
    cfg = make_cfg(f"task={task}", "train.lr=1e4", "train.schedule=constant", "train.warmup_ratio=0")
    row = run(cfg)
    assert row["status"] == "diverged", row
    assert "NaN or inf" in row["error"]
    written = rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, row["run_key"]))
    assert written["status"] == "diverged" and not rows.is_done(written)


def test_the_row_writer_refuses_an_ok_row_holding_a_non_finite_score():
    base = {"run_key": "k" * 16, "status": "ok", "score_best": 0.5, "score_last": 0.5}
    rows.make_row(base)
    for bad in ({"score_best": math.nan}, {"score_selected": math.nan}, {"metric_pearson": math.inf},
                {"last_metrics_json": '{"score": NaN}'}, {"rank_scores_json": '{"r=1": NaN, "r=8": 0.5}'}):
        with pytest.raises(ValueError, match="ok row cannot hold non-finite"):
            rows.make_row({**base, **bad})
    rows.make_row({**base, "status": "diverged", "score_best": math.nan})  # a diverged row may say so


def test_non_finite_evaluation_outputs_mean_diverged_even_with_finite_parameters():
    from harness.run import check_finite, watch_eval_outputs
    model = torch.nn.Linear(2, 2)
    outcome = TrainOutcome(steps=3, best={"step": 3, "score": 0.5}, last={"step": 3, "score": 0.5})
    with watch_eval_outputs(model) as watch:
        model.train()
        model(torch.tensor([[1e39, 0.0]]))  # training forwards are the loss's business
        check_finite(model, outcome, watch, "accuracy")
        model.eval()
        model(torch.tensor([[1e39, 0.0]]))  # inf in evaluation: fp16 overflow looks like this
    with pytest.raises(Diverged, match="outputs are not finite"):
        check_finite(model, outcome, watch, "accuracy")
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(Diverged, match="parameter weight holds NaN"):
        check_finite(model, outcome, {}, "accuracy")


def test_an_undefined_score_with_finite_outputs_is_not_ok():
    """Constant predictions: pearson is NaN although nothing diverged; the run has no score, so it fails."""
    from harness.errors import NoScore
    from harness.run import check_finite
    model = torch.nn.Linear(2, 1)
    outcome = TrainOutcome(steps=3, best={"step": 3, "score": math.nan, "pearson": math.nan},
                           last={"step": 3, "score": math.nan, "pearson": math.nan})
    with pytest.raises(NoScore, match="pearson"):
        check_finite(model, outcome, {}, "pearson")


def test_an_undefined_score_at_the_selected_evaluation_is_not_ok():
    """train.selection=heldout can pick an evaluation that is neither the best nor the last: its score (the row's
    score_selected, the heldout table's cell) must be finite too."""
    from harness.errors import NoScore
    from harness.run import check_finite
    finite = {"step": 9, "score": 0.4, "pearson": 0.4}
    outcome = TrainOutcome(steps=9, best=finite, last=finite,
                           selected={"step": 3, "score": math.nan, "pearson": math.nan, "selection_score": 0.2})
    with pytest.raises(NoScore, match="pearson"):
        check_finite(torch.nn.Linear(2, 1), outcome, {}, "pearson")


def test_dylora_records_an_undefined_score_at_a_truncated_rank_as_null(make_cfg):
    """STS-B at rank 1 can predict a constant (correlation NaN) while the trained rank is fine: the run is ok,
    and its row says "no score" at that rank rather than holding a NaN."""
    from harness import adapters
    columns = adapters.build(make_cfg("variant=dylora").variant).row_columns({"r=1": math.nan, "r=8": 0.5})
    assert json.loads(columns["rank_scores_json"]) == {"r=1": None, "r=8": 0.5}
    rows.make_row({"run_key": "k" * 16, "status": "ok", "score_best": 0.5, **columns})


def test_an_ok_row_with_a_nan_score_from_older_code_is_run_again(make_cfg):
    cfg = make_cfg()
    key = run_keys.run_key(cfg)
    old = rows.make_row({"run_key": key, "status": "failed"}).assign(status="ok", score_best=math.nan)
    atomic_write_parquet(old, rows.row_path(cfg.results_dir, cfg.sweep_name, key), rows.SCHEMA)
    assert sweep.job_state(cfg, []).status == "nan"
    row = run(cfg)
    assert row["status"] == "ok" and math.isfinite(row["score_best"])


def test_the_divergence_hint_offers_fp32_only_to_runs_not_in_fp32():
    from harness.train import divergence_hint
    assert "fp32" not in divergence_hint("fp32")
    assert "train.precision=fp32" in divergence_hint("bf16")


# ---- 2. labels of the evaluation split ---------------------------------------------------------------
def test_out_of_range_evaluation_labels_are_an_error_naming_file_column_and_values(make_cfg, tiny_data_dir, tmp_path):
    data = copy_of_data(tiny_data_dir, tmp_path)
    edit_split(data, "rte", "validation", lambda f: f.assign(label=f.label.where(f.label == 0, 7)))
    cfg = make_cfg(data_dir=data)
    with pytest.raises(DataError, match=r"validation.*rte/validation.parquet.*column 'label'.*\[7\]"):
        run(cfg)
    assert list(rows.runs_dir(cfg.results_dir, cfg.sweep_name).glob("*.parquet")) == []


def test_an_evaluation_split_without_labels_is_an_error_that_says_it_looks_like_a_test_split(make_cfg, tiny_data_dir,
                                                                                              tmp_path):
    data = copy_of_data(tiny_data_dir, tmp_path)
    edit_split(data, "rte", "validation", lambda f: f.assign(label=-1))  # GLUE's test splits hide labels as -1
    cfg = make_cfg(data_dir=data)
    with pytest.raises(DataError, match=r"split 'validation' .*has no labels.*a test split"):
        run(cfg)


# ---- 3. the data is part of the run's identity -----------------------------------------------------------
def test_changed_data_under_the_same_config_is_another_run(make_cfg, tiny_data_dir, tmp_path):
    data = copy_of_data(tiny_data_dir, tmp_path)
    before = make_cfg(data_dir=data)
    key = run_keys.run_key(before)
    edit_split(data, "rte", "validation", lambda f: f.assign(label=1 - f.label))
    assert run_keys.run_key(make_cfg(data_dir=data)) != key
    assert run_keys.run_key(make_cfg(data_dir=tiny_data_dir)) == key  # where the data lives does not matter


def test_the_row_records_the_data_fingerprint(make_cfg):
    cfg = make_cfg()
    row = run(cfg)
    assert row["status"] == "ok" and row["data_fingerprint"] == run_keys.data_fingerprint(cfg)
    assert len(row["data_fingerprint"]) == 16


def test_migration_gives_old_rows_todays_keys_once(make_cfg):
    from harness.migrate_keys import main as migrate, v1_run_key
    cfg = make_cfg()
    row = run(cfg)
    runs = rows.runs_dir(cfg.results_dir, cfg.sweep_name)
    config = json.loads(row["config_json"])
    old_key = v1_run_key(config)
    (runs / row["run_key"]).rename(runs / old_key)  # what the key version 1 wrote
    old = rows.make_row({**row, "run_key": old_key, "data_fingerprint": None})
    atomic_write_parquet(old, runs / f"{old_key}.parquet", rows.SCHEMA)
    (runs / f"{row['run_key']}.parquet").unlink()
    migrate([str(cfg.results_dir)])
    migrated = rows.read_row(runs / f"{row['run_key']}.parquet")
    assert migrated["run_key"] == row["run_key"] and migrated["data_fingerprint"] == row["data_fingerprint"]
    assert (runs / row["run_key"] / "history.parquet").exists() and not (runs / f"{old_key}.parquet").exists()
    files = sorted(p.name for p in runs.rglob("*"))
    migrate([str(cfg.results_dir)])
    assert sorted(p.name for p in runs.rglob("*")) == files


# ---- 4. corrupt row files --------------------------------------------------------------------------------
def test_a_corrupt_row_file_is_set_aside_and_its_run_counts_as_not_done(make_cfg, caplog):
    cfg = make_cfg()
    key = run_keys.run_key(cfg)
    good = rows.write_row(cfg.results_dir, cfg.sweep_name, {"run_key": "0" * 16, "status": "failed"})
    path = rows.row_path(cfg.results_dir, cfg.sweep_name, key)
    path.write_bytes(good.read_bytes()[:100])  # a truncated copy
    with caplog.at_level(logging.WARNING):
        assert len(rows.read_rows(cfg.results_dir)) == 1  # the report reads on, and leaves the file alone
        assert str(path) in caplog.text and path.exists()
        state = sweep.job_state(cfg, [])
    assert state.status == "todo"
    assert not path.exists() and len(list((path.parent / ".corrupt").glob(f"{key}.parquet.*"))) == 1
    assert "moved to" in caplog.text


# ---- 5. ranks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,rank", [("lora", 65), ("dylora", 100000), ("vera", 4097)])
def test_a_rank_above_what_a_targeted_layer_allows_is_a_config_error(make_cfg, variant, rank):
    """tiny_roberta's query and value are 64 x 64: LoRA's B A has rank <= 64; VeRA's d may reach 64 x 64 entries."""
    with pytest.raises(ConfigError, match=r"variant.r=\d+ is too large for .*query \(64 in x 64 out\)"):
        run(make_cfg(f"variant={variant}", f"variant.r={rank}"))


def test_the_largest_rank_a_layer_allows_still_builds(make_cfg):
    from harness.assemble import assemble

    for variant, rank in (("lora", 64), ("vera", 4096)):
        assert assemble(make_cfg(f"variant={variant}", f"variant.r={rank}"), with_tokenizer=False).targeted


# ---- 6. results_dir ------------------------------------------------------------------------------------------
def test_an_unwritable_results_dir_is_found_before_anything_is_loaded(make_cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr("harness.models.load", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(ConfigError, match="results_dir=.*cannot write"):
        run(make_cfg(f"results_dir={blocker / 'results'}"))


# ---- 7. empty splits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "validation"])
def test_an_empty_split_is_named_at_load_time(make_cfg, tiny_data_dir, tmp_path, split):
    data = copy_of_data(tiny_data_dir, tmp_path)
    edit_split(data, "rte", split, lambda f: f.iloc[:0])
    with pytest.raises(DataError, match=f"task rte: split '{split}' is empty"):
        run(make_cfg(data_dir=data))


# ---- 8. unknown keys ----------------------------------------------------------------------------------------
def compose_with(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("overrides,expected", [
    (["+train.maxsteps=20"], "train has no key 'maxsteps'; did you mean train.max_steps?"),
    (["++data.max_train_sample=5"], "did you mean data.max_train_samples?"),
    (["+sed=3"], "the top level has no key 'sed'; did you mean seed?"),
    (["task=stsb", "+task.primary_metrc=f1"], "did you mean task.primary_metric?"),
    (["model=minilm", "+model.nam=x"], "did you mean model.name?"),
    (["variant=lora", "+variant.d_initial=0.2"], "variant has no key 'd_initial'"),
    (["+trian.max_steps=3"], "the top level has no key 'trian'; did you mean train?"),
])
def test_every_config_group_rejects_keys_it_does_not_define(overrides, expected):
    from harness.__main__ import unknown_added_keys
    messages = unknown_added_keys(overrides, compose_with)
    assert len(messages) == 1 and expected in messages[0]


def test_keys_a_chosen_variant_or_task_defines_are_accepted():
    from harness.__main__ import unknown_added_keys
    assert unknown_added_keys(["variant=vera", "+variant.d_initial=0.2", "+sweep=smoke", "++train.max_steps=3",
                               "task=squad", "+task.doc_stride=64"], compose_with) == []


def test_the_retired_name_adapter_impl_is_an_error_naming_variant_impl():
    from harness.__main__ import renamed_override_errors
    [message] = renamed_override_errors(["model=minilm", "adapter.impl=peft", "variant.impl=ours"])
    assert "adapter.impl=peft" in message and "use variant.impl=peft" in message
    assert renamed_override_errors(["+adapter.impl=ours,peft"])[0].endswith("use variant.impl=ours,peft")
    done = subprocess.run([sys.executable, "-m", "harness", "adapter.impl=peft"], cwd=REPO, env=CLI_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "variant.impl=peft" in done.stderr and "Traceback" not in done.stderr


def test_configs_from_before_variant_impl_was_the_one_name_keep_their_run_keys():
    """Older configs also held adapter.impl (which variant.impl read); today's configs give the same key."""
    for impl in ("ours", "peft"):
        today = compose_with(["variant=lora", f"variant.impl={impl}"])
        older = OmegaConf.to_container(today, resolve=True)
        older["adapter"] = {"impl": impl}
        assert run_keys.run_key(today) == run_keys.run_key(older)
    mixed = OmegaConf.to_container(compose_with(["variant=lora", "variant.impl=peft"]), resolve=True)
    mixed["adapter"] = {"impl": "ours"}  # variant.impl set directly, as an older config could: its own key
    assert run_keys.run_key(mixed) != run_keys.run_key(compose_with(["variant=lora", "variant.impl=peft"]))


# ---- 9. errors before the run ----------------------------------------------------------------------------------
def test_a_config_error_on_the_command_line_is_one_line_and_leaves_no_row(tmp_path, tiny_data_dir):
    done = subprocess.run([sys.executable, "-m", "harness", "model=tiny_roberta", f"data.dir={tiny_data_dir}",
                           f"results_dir={tmp_path}", "+train.maxsteps=20"],
                          cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "train.max_steps" in errors[0] and "Traceback" not in done.stderr
    assert list(tmp_path.glob("*/runs/*.parquet")) == []


@pytest.mark.slow
def test_the_default_command_offline_is_one_line_and_leaves_no_row(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness", f"results_dir={tmp_path}"], cwd=REPO, env=CLI_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "model=minilm" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: ")
    assert list(tmp_path.glob("*/runs/*.parquet")) == []


@pytest.mark.slow
def test_a_second_run_of_a_key_in_progress_is_one_line(tmp_path, tiny_data_dir):
    overrides = ["model=tiny_roberta", f"data.dir={tiny_data_dir}", f"results_dir={tmp_path}", "train.max_steps=2"]
    cfg = compose_with(overrides)
    lock = sweep.lock_path(cfg, run_keys.run_key(cfg))
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([sys.executable, "-m", "harness", *overrides], cwd=REPO, env=CLI_ENV,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is being run by another process right now" in done.stderr


def test_pre_run_errors_write_no_row_and_failures_during_training_do(make_cfg):
    cfg = make_cfg("variant.r=0")
    with pytest.raises(ConfigError, match="variant.r=0"):
        run(cfg)
    assert not rows.runs_dir(cfg.results_dir, cfg.sweep_name).exists() or \
        list(rows.runs_dir(cfg.results_dir, cfg.sweep_name).glob("*.parquet")) == []


def test_the_sweep_summary_lists_jobs_that_did_not_start(tmp_path):
    sweep.record_job_error(tmp_path / "3", ["task=rte", "variant.r=100000"],
                           ConfigError("variant.r=100000 is too large"))
    sweep.record_job_error(tmp_path / "12", ["task=stsb"], DataError("split 'validation' is empty"))
    errors = sweep.job_errors(tmp_path)
    assert errors == [("task=rte variant.r=100000", "ConfigError: variant.r=100000 is too large"),
                      ("task=stsb", "DataError: split 'validation' is empty")]
    text = sweep.format_summary("s", pd.DataFrame({c: [] for c in rows.COLUMNS}), 5, errors)
    assert "2 jobs did not start" in text and "task=stsb: DataError" in text


# ---- 10. the smaller ones ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_a_config_error_naming_seed(make_cfg, seed):
    with pytest.raises(ConfigError, match="seed="):
        run(make_cfg(f"seed={seed}"))


def test_a_batch_larger_than_the_training_set_is_recorded_as_it_ran(make_cfg):
    row = run(make_cfg("train.batch_size=500", "data.max_train_samples=20", "train.max_steps=2"))
    assert row["status"] == "ok" and row["batch_size"] == 20 == row["train_examples"]


def test_a_summary_of_no_finished_runs_says_so():
    text = sweep.format_summary("s", pd.DataFrame({c: [] for c in rows.COLUMNS}), 3)
    assert text == "sweep s: no run finished in this sitting; 3 ok rows in the sweep"


# ---- the report ----------------------------------------------------------------------------------------------
def write_synthetic_rows(folder, specs) -> None:
    """Rows as a run writes them (config_json composed from the YAMLs), scores given; written without make_row,
    so that an `ok` row with a NaN score, as older code wrote it, can be made."""
    for i, values in enumerate(specs):
        model, variant = values["model"], values["variant"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"model={model}", "task=rte", f"variant={variant}"])
        row = {"run_key": f"{i:016d}", "sweep": folder.name, "task": "rte", "rank": 8 if variant == "lora" else None,
               "impl": "ours", "seed": 0, "primary_metric": "accuracy", "protocol": "standard",
               "trainable_params_no_head": 10, "config_json": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
               **values}
        frame = rows.make_row({**row, "status": "failed"}).assign(status=row["status"])
        atomic_write_parquet(frame, rows.row_path(folder.parent, folder.name, row["run_key"]), rows.SCHEMA)


def test_a_report_holding_only_an_old_ok_row_with_a_nan_score_says_so_instead_of_crashing(tmp_path):
    from harness import report

    write_synthetic_rows(tmp_path / "s", [{"status": "ok", "model": "tiny_roberta", "variant": "lora",
                                           "score_best": math.nan, "metric_accuracy": math.nan}])
    with pytest.raises(report.ReportError, match="no ok rows among 1.*without a finite score"):
        report.paper_table(report.load(tmp_path / "s"))


def test_with_two_models_the_caption_says_bold_is_the_best_per_model(tmp_path):
    from harness import report

    write_synthetic_rows(tmp_path / "s", [
        {"status": "ok", "model": model, "variant": variant, "score_best": score, "metric_accuracy": score}
        for model, variant, score in [("tiny_roberta", "lora", 0.6), ("tiny_roberta", "full", 0.5),
                                      ("minilm", "lora", 0.6), ("minilm", "full", 0.7)]])
    text = report.markdown(report.results_grid(report.paper_table(report.load(tmp_path / "s"))))
    assert "Bold: best in the column for each model." in text
    assert text.count("**60.0**") == 2 and text.count("**70.0**") == 2  # tiny's LoRA and minilm's full FT (+Avg.)
