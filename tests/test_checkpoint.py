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



def test_the_peft_copy_is_the_checkpoint_the_row_scores(make_cfg):
    """`peft_adapter/` is what a user loads into peft to use the run (tests/test_variants.py checks it predicts
    what our model predicts): it must hold the selected evaluation's weights, the row's score, not the last."""
    from safetensors.torch import load_file

    from harness import adapters
    from harness.adapters.peft_bridge import peft_key

    cfg = make_cfg("train.max_steps=12", "train.eval_every_steps=2", "train.lr=5e-2", "variant=lora", "seed=1")
    row = run(cfg)
    assert row["best_step"] != row["steps"], "this config must give a best evaluation before the last one"
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    best, last = (load_file(artifacts / f) for f in ("adapter_best.safetensors", "adapter.safetensors"))
    in_peft = load_file(artifacts / "peft_adapter" / "adapter_model.safetensors")
    variant = adapters.build(cfg.variant)
    assert any(not torch.equal(best[k], last[k]) for k in best), "the checkpoints must differ, or this could not fail"
    for name, tensor in best.items():
        torch.testing.assert_close(in_peft[peft_key(name, variant)], tensor, rtol=0, atol=0, msg=name)
