"""Saved adapters (harness/checkpoint.py): the last and the best evaluation's weights reload into a fresh model and
reproduce the run's predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness import rows
from harness.assemble import assemble
from harness.checkpoint import load_adapter
from harness.run import run


def reload_and_predict(cfg, adapter_path: Path) -> np.ndarray:
    """Validation predictions of a fresh base model (adapter and head zeroed) with `adapter_path` loaded."""
    from harness.train import predict

    fresh = assemble(cfg)  # the same random base; adapter and head reset below
    task = fresh.task
    with torch.no_grad():
        for _, param in fresh.model.named_parameters():
            if param.requires_grad:
                param.zero_()
    load_adapter(fresh.model, adapter_path)
    _, evals = task.datasets(fresh.tokenizer, cfg.seed)
    outputs, _, _ = predict(fresh.model, task, evals["validation"], task.collate(fresh.tokenizer), cfg.train,
                            torch.device("cpu"), None)
    return outputs["prediction"]


def test_saved_adapter_reloads_into_a_fresh_model_with_identical_predictions(make_cfg):
    cfg = make_cfg("train.max_steps=3")
    row = run(cfg)
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    saved = pd.read_parquet(artifacts / "predictions.parquet").query("checkpoint == 'last'")
    np.testing.assert_array_equal(reload_and_predict(cfg, artifacts / "adapter.safetensors"), saved["prediction"])
    assert not (artifacts / "adapter_best.safetensors").exists(), "one evaluation: best is last"


def test_the_best_evaluation_is_saved_too_and_reproduces_its_predictions(make_cfg):
    """The row's headline score is the best evaluation's, so its weights must be reloadable, not only the last."""
    cfg = make_cfg("train.max_steps=12", "train.eval_every_steps=2", "train.lr=5e-3", "variant=full", "seed=1")
    row = run(cfg)
    assert row["best_step"] != row["steps"], "this config must give a best evaluation before the last one"
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    saved = pd.read_parquet(artifacts / "predictions.parquet")
    best, last = (saved.query(f"checkpoint == '{c}'")["prediction"].to_numpy() for c in ("best", "last"))
    assert (best != last).any(), "the two checkpoints must predict differently, or this test could not fail"
    for checkpoint, file in [("best", "adapter_best.safetensors"), ("last", "adapter.safetensors")]:
        expected = saved.query("checkpoint == @checkpoint")["prediction"]
        np.testing.assert_array_equal(reload_and_predict(cfg, artifacts / file), expected)
