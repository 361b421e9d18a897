"""One run end to end (harness/run.py and `python -m harness`) on the tiny random RoBERTa: the row it writes,
skipping and keys, the tasks' heads, divergence and config errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness import rows, run_keys
from harness import run as run_module
from harness.errors import ConfigError
from harness.run import run

from conftest import REPO


def test_run_writes_a_complete_row_with_history_and_predictions(make_cfg):
    cfg = make_cfg("train.max_steps=6", "train.eval_every_steps=3")
    row = run(cfg)
    assert row["status"] == "ok", row["error"]
    path = rows.row_path(cfg.results_dir, cfg.sweep_name, row["run_key"])
    stored = pd.read_parquet(path)
    assert list(stored.columns) == rows.COLUMNS and len(stored) == 1
    stored = stored.iloc[0]
    assert stored.steps == 6 and stored.trainable_params > stored.trainable_params_no_head > 0
    assert 0 <= stored.score_best <= 1 and stored.metric_accuracy == stored.score_best
    assert stored.train_samples_per_s > 0 and stored.eval_samples_per_s > 0 and stored.cpu_peak_rss_bytes > 0
    # AdamW: exp_avg and exp_avg_sq per trainable tensor, plus a 4-byte step counter each
    assert stored.saved_activation_bytes > 0 and 0 <= stored.optimizer_state_bytes - 2 * stored.grad_bytes < 4 * 64
    assert stored.grad_bytes == 4 * stored.trainable_params
    assert stored.protocol.startswith("standard") and stored.adapter_bytes > 0
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    history = pd.read_parquet(artifacts / "history.parquet")
    assert list(history.step) == [3, 6]
    predictions = pd.read_parquet(artifacts / "predictions.parquet")
    assert set(predictions.checkpoint) == {"best", "last"} and (predictions.checkpoint == "last").sum() == 40


def test_a_retry_keeps_the_earlier_attempts_files_until_it_trains_then_replaces_them(make_cfg):
    """An error found before training changes nothing (no row, docs/failures.md); a retry that trains starts
    from an empty folder, so no earlier history, predictions or adapter can pass for its own."""
    early = make_cfg("train.precision=fp16")  # fails at its start on CPU, before any evaluation
    cfg = make_cfg()
    for config in (early, cfg):  # an earlier attempt's files and failed row
        artifacts = rows.artifacts_dir(config.results_dir, config.sweep_name, run_keys.run_key(config))
        artifacts.mkdir(parents=True)
        pd.DataFrame({"step": [999], "score": [0.9]}).to_parquet(artifacts / "history.parquet")
        (artifacts / "adapter.safetensors").write_bytes(b"an earlier attempt's")
        rows.write_row(config.results_dir, config.sweep_name,
                       {"run_key": run_keys.run_key(config), "status": "failed"})
    with pytest.raises(ConfigError, match="fp16"):
        run(early)
    earlier = rows.artifacts_dir(early.results_dir, early.sweep_name, run_keys.run_key(early))
    assert pd.read_parquet(earlier / "history.parquet").step.tolist() == [999]
    kept = rows.read_row(rows.row_path(early.results_dir, early.sweep_name, run_keys.run_key(early)))
    assert kept["status"] == "failed"
    row = run(cfg)
    assert row["status"] == "ok"
    history = pd.read_parquet(artifacts / "history.parquet")
    assert 999 not in history.step.tolist()
    assert (artifacts / "adapter.safetensors").read_bytes() != b"an earlier attempt's"


def test_a_schedule_error_found_by_the_training_loop_still_leaves_the_earlier_attempt(make_cfg):
    """Delta-LoRA's K against the run's steps is the last check before training (the loop's): it must come before
    the run touches the earlier attempt's row and files."""
    cfg = make_cfg("variant=delta_lora", "variant.start_step=100000")
    key = run_keys.run_key(cfg)
    rows.write_row(cfg.results_dir, cfg.sweep_name, {"run_key": key, "status": "failed"})
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, key)
    artifacts.mkdir(parents=True)
    (artifacts / "config.yaml").write_text("an earlier attempt's")
    with pytest.raises(ConfigError, match="start_step"):
        run(cfg)
    assert rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, key))["status"] == "failed"
    assert (artifacts / "config.yaml").read_text() == "an earlier attempt's"


def test_a_rerun_that_crashes_before_training_writes_its_row_without_the_earlier_files(make_cfg, monkeypatch):
    """Not a config error but a crash (or a stop signal) while loading: the run ends as a row, and that row must not
    sit beside the ok attempt's history, predictions and adapter, which a report would read as its own."""
    cfg = make_cfg()
    first = run(cfg)
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, first["run_key"])
    assert (artifacts / "history.parquet").exists()

    def crash(*_):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(run_module, "read_splits", crash)
    row = run(make_cfg("rerun=true"))
    assert row["status"] == "failed" and "disk went away" in row["error"]
    assert sorted(p.name for p in artifacts.iterdir()) == ["config.yaml"]


def test_same_config_is_skipped_and_changed_config_gets_a_new_key(make_cfg):
    first = run(make_cfg())
    again = run(make_cfg())
    assert again["run_key"] == first["run_key"] and again["finished_at"] == first["finished_at"]
    assert run_keys.run_key(make_cfg("seed=1")) != first["run_key"]
    assert run_keys.run_key(make_cfg("results_dir=/elsewhere", "device=cuda")) == first["run_key"]


def test_a_skipped_row_from_another_device_is_kept_with_a_warning(make_cfg, caplog):
    cfg = make_cfg()
    first = run(cfg)
    rows.write_row(cfg.results_dir, cfg.sweep_name, {**first, "device": "cuda:NVIDIA A100-SXM4-80GB"})
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        again = run(cfg)
    assert again["device"] == "cuda:NVIDIA A100-SXM4-80GB" and again["finished_at"] == first["finished_at"]
    assert "measured on cuda:NVIDIA A100-SXM4-80GB" in caplog.text and "sweep_name" in caplog.text
    caplog.clear()
    rows.write_row(cfg.results_dir, cfg.sweep_name, {**first, "device": "cpu:1 threads@elsewhere"})
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        run(cfg)
    assert "measured on" not in caplog.text  # another CPU host or thread count is the same kind of device


def test_a_skipped_row_that_auto_computed_in_another_precision_is_kept_with_a_warning(make_cfg, caplog):
    """precision=auto is in the run_key as `auto`: a sweep resumed where auto means fp32 keeps a bf16 row."""
    cfg = make_cfg("train.precision=auto")
    first = run(cfg)
    other = "fp32" if first["precision"] == "bf16" else "bf16"
    rows.write_row(cfg.results_dir, cfg.sweep_name, {**first, "precision": other})
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        again = run(cfg)
    assert again["precision"] == other and again["finished_at"] == first["finished_at"]
    assert f"computed in {other} (train.precision=auto), which is {first['precision']} on this machine" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        run(make_cfg("train.precision=fp32"))
        run(make_cfg("train.precision=fp32"))
    assert "computed in" not in caplog.text


def test_an_ok_row_made_with_other_weights_at_the_same_path_is_run_again(make_cfg, tmp_path, caplog):
    """The run_key names a local model's folder, not its contents (committed rows keep their keys): the row records
    a fingerprint of the files, and neither a run nor a sweep keeps an ok row whose files were replaced since."""
    import torch

    from harness import models, sweep

    folder = tmp_path / "my-encoder"
    cfg = make_cfg(f"model.source={folder}", "model.init=pretrained")
    encoder = models.load(make_cfg().model, "classification", 2, cfg.data.cache_dir, with_tokenizer=False).model
    encoder.save_pretrained(folder)
    first = run(cfg)
    assert first["status"] == "ok" and first["model_fingerprint"] is not None
    assert run(cfg)["wall_seconds"] == first["wall_seconds"]  # the same files: the row is kept, not run again
    assert sweep.job_state(cfg, []).done

    with torch.no_grad():
        encoder.roberta.embeddings.word_embeddings.weight.mul_(2)
    time.sleep(0.01)  # another mtime, as any rewrite of the file gives
    encoder.save_pretrained(folder)  # other weights, same path: the same run_key
    assert run_keys.run_key(cfg) == first["run_key"]
    assert sweep.job_state(cfg, []).status == "other weights"
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        again = run(cfg)
    assert "loaded other files from" in caplog.text and again["wall_seconds"] != first["wall_seconds"]
    assert again["status"] == "ok" and again["model_fingerprint"] not in (None, first["model_fingerprint"])
    assert rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, first["run_key"]))["model_fingerprint"] == \
        again["model_fingerprint"]
    assert run_keys.model_fingerprint(make_cfg()) is None  # a random init loads no files


def test_the_remembered_file_hashes_are_only_a_speed_up(tmp_path, monkeypatch):
    """A truncated memo entry (a crash elsewhere, a shared cache) is hashed again, not trusted; a memo folder that
    cannot be written costs the speed-up, not the run."""
    import hashlib

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    truth = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(run_keys, "_file_hashes", {})
    assert run_keys.file_hash(weights, tmp_path / "memo") == truth
    [entry] = (tmp_path / "memo").iterdir()
    entry.write_text("")
    monkeypatch.setattr(run_keys, "_file_hashes", {})
    assert run_keys.file_hash(weights, tmp_path / "memo") == truth and entry.read_text() == truth
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setattr(run_keys, "_file_hashes", {})
    assert run_keys.file_hash(weights, tmp_path / "not-a-folder") == truth


def test_regression_head_for_stsb(make_cfg):
    row = run(make_cfg("task=stsb"))
    assert row["status"] == "ok", row["error"]
    assert row["primary_metric"] == "pearson" and row["metric_spearman"] is not None


def test_mnli_scores_matched_and_mismatched(make_cfg):
    row = run(make_cfg("task=mnli", "data.protocol=holdout"))
    assert row["status"] == "ok", row["error"]
    assert row["metric_accuracy"] is not None and row["metric_accuracy_mm"] is not None
    assert row["protocol"].startswith("holdout")


def test_qqp_and_qnli_run_under_the_holdout_protocol(make_cfg):
    qqp = run(make_cfg("task=qqp", "data.protocol=holdout"))
    assert qqp["status"] == "ok", qqp["error"]
    assert qqp["metric_accuracy"] is not None and qqp["metric_f1"] is not None
    qnli = run(make_cfg("task=qnli", "data.protocol=holdout"))
    assert qnli["status"] == "ok", qnli["error"]
    assert qnli["primary_metric"] == "accuracy" and qnli["protocol"].startswith("holdout")


def test_divergence_is_a_row_not_a_crash(make_cfg):
    row = run(make_cfg("train.lr=1e12", "train.max_grad_norm=null", "train.max_steps=8", "variant=full"))
    assert row["status"] == "diverged" and "loss became" in row["error"]


def test_a_config_error_is_raised_and_writes_no_row(make_cfg):
    cfg = make_cfg("variant.r=0")
    with pytest.raises(ConfigError, match="variant.r=0"):
        run(cfg)
    assert list(rows.runs_dir(cfg.results_dir, cfg.sweep_name).glob("*.parquet")) == []


def test_rows_say_whether_the_selected_checkpoint_is_degenerate(make_cfg):
    row = run(make_cfg("task=rte", "train.max_steps=2", "save_adapter=false"))
    folder = rows.artifacts_dir(make_cfg().results_dir, "default", row["run_key"])
    best = pd.read_parquet(folder / "predictions.parquet").query("checkpoint == 'best'")
    assert isinstance(row["degenerate"], bool) and row["degenerate"] == (best.prediction.nunique() == 1)


def test_cli_run_produces_a_row(tmp_path, tiny_data_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "harness", "model=tiny_roberta", "task=rte", f"data.dir={tiny_data_dir}",
           f"results_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2",
           "sweep_name=cli"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = rows.read_rows(tmp_path / "cli")
    assert len(found) == 1 and found.status.iloc[0] == "ok"


def test_cli_default_fails_fast_offline_naming_the_overrides_that_work(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness", f"results_dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert "model=minilm" in done.stderr and "data.dir=" in done.stderr


def test_saved_predictions_are_sorted_with_ids_stored_as_differences(tmp_path):
    """MNLI's 35k saved predictions take 19 KB this way instead of 122: sorted by checkpoint, split and example,
    with GLUE's integer ids delta-encoded. The report pairs predictions by id, so the order is free to choose."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"split": rng.choice(["validation_matched", "validation_mismatched"], 30_000),
                          "idx": rng.permutation(30_000), "label": rng.integers(0, 3, 30_000),
                          "prediction": rng.integers(0, 3, 30_000), "checkpoint": "best"})
    run_module.write_predictions(frame, tmp_path / "predictions.parquet")
    saved = pd.read_parquet(tmp_path / "predictions.parquet")
    assert saved.equals(frame.sort_values(["checkpoint", "split", "idx"], ignore_index=True))
    column = pq.ParquetFile(tmp_path / "predictions.parquet").metadata.row_group(0).column(1)
    assert column.path_in_schema == "idx" and "DELTA_BINARY_PACKED" in column.encodings
