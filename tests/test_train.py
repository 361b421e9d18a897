"""The training loop (harness/train.py): the same steps as transformers' Trainer, the head's learning rate,
precision, gradient checkpointing, the schedule's step counts, train.* validation and checkpoint selection."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from harness import adapters, rows
from harness.assemble import assemble, read_splits
from harness.errors import ConfigError
from harness.meters import SavedTensorMeter
from harness.run import run
from harness.train import build_optimizer, enable_activation_checkpointing, schedule_steps, validate_train

from conftest import peft_twin


def test_training_loop_takes_the_same_steps_as_the_transformers_trainer(make_cfg, tmp_path):
    """Our loop against the outside reference, transformers' Trainer with peft's LoRA: same weights in, the
    same batches, no dropout -> the same loss at every step and the same trained weights. Covers what a
    loop can get subtly wrong: AdamW's decay groups, warmup then linear decay (off by one?), clipping, eps.

    One batch is the whole training set, so the two samplers' orders cannot differ."""
    from transformers import Trainer, TrainingArguments

    from harness.train import TrainingLoop

    cfg = make_cfg("task=sst2", "variant.r=4", "variant.alpha=8", "train.max_steps=10", "train.batch_size=96",
                   "train.lr=5e-3", "train.warmup_ratio=0.3", "train.max_grad_norm=0.05", "train.weight_decay=0.5")
    ours = assemble(cfg)
    theirs = peft_twin(cfg, ours)
    for module in [*ours.model.modules(), *theirs.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    splits = read_splits(cfg, ours)
    assert len(splits.train) == cfg.train.batch_size
    collate = ours.task.collate(ours.tokenizer)

    outcome = TrainingLoop(ours, splits, cfg.train, torch.device("cpu"), cfg.seed).run()
    recipe = cfg.train  # the same values, spelled as TrainingArguments
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=recipe.max_steps, per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.lr, warmup_steps=outcome.warmup_steps, lr_scheduler_type=recipe.schedule,
        max_grad_norm=recipe.max_grad_norm, weight_decay=recipe.weight_decay, adam_beta1=recipe.adam_betas[0],
        adam_beta2=recipe.adam_betas[1], adam_epsilon=recipe.adam_eps, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=theirs, args=args, train_dataset=splits.train,
                      data_collator=lambda batch: {k: v for k, v in collate(batch).items() if k != "idx"})
    trainer.train()

    our_losses = [entry["train_loss"] for entry in outcome.history]  # one evaluation per epoch = per step
    their_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert outcome.warmup_steps == 3 and len(our_losses) == len(their_losses) == 10
    assert max(our_losses) - min(our_losses) > 0.005  # the steps moved the loss, so equal losses say something
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-4, atol=1e-5)
    for name, layer in adapters.adapter_layers(ours.model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A, peft_layer.lora_A["default"].weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B, peft_layer.lora_B["default"].weight, rtol=1e-4, atol=1e-6)
        assert layer.lora_B.abs().max() > 1e-3  # B left zero well beyond the tolerance
    their_head = theirs.base_model.model.classifier.modules_to_save["default"].state_dict()
    for key, value in ours.model.classifier.state_dict().items():
        torch.testing.assert_close(value, their_head[key], rtol=1e-4, atol=1e-6)


def test_head_lr_trains_the_head_at_its_own_rate(make_cfg):
    """Adam's first step moves each weight by lr * g / (|g| + eps), i.e. by lr wherever the gradient is not tiny:
    the head by train.head_lr, the adapters by train.lr."""
    cfg = make_cfg("train.lr=1e-3", "train.head_lr=3e-2", "train.weight_decay=0", "train.adam_eps=1e-12")
    setup = assemble(cfg)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(setup.model, setup.variant, setup.head, cfg.train)
    decayed = build_optimizer(setup.model, setup.variant, setup.head,
                              make_cfg("train.head_lr=3e-2", "train.weight_decay=0.3").train)
    assert {(g["name"], g["lr"], g["weight_decay"]) for g in decayed.param_groups} == {  # LoRA: A, B are matrices
        ("decay", 5e-4, 0.3), ("decay_head", 3e-2, 0.3), ("no_decay_head", 3e-2, 0.0)}
    setup.model(input_ids=torch.randint(3, 500, (4, 9)), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    optimizer.step()
    moved_by = {"head": [], "adapter": []}
    for name, param in setup.model.named_parameters():
        if param.requires_grad:
            moved = (param.detach() - before[name])[param.grad.abs() > 1e-8]
            moved_by["head" if name.startswith("classifier.") else "adapter"].append(moved.abs())
    head, adapter = torch.cat(moved_by["head"]), torch.cat(moved_by["adapter"])
    assert head.numel() > 100 and adapter.numel() > 100
    torch.testing.assert_close(head, torch.full_like(head, 3e-2), rtol=1e-2, atol=0)
    torch.testing.assert_close(adapter, torch.full_like(adapter, 1e-3), rtol=1e-2, atol=0)


def test_fp16_on_cpu_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        run(make_cfg("train.precision=fp16"))


def test_bf16_runs_on_cpu_with_autocast(make_cfg):
    row = run(make_cfg("train.precision=bf16"))
    assert row["status"] == "ok", row["error"]


def test_gradient_checkpointing_gives_the_same_gradients_with_a_frozen_base(make_cfg):
    cfg = make_cfg("variant.dropout=0.0")
    setup = assemble(cfg)
    model = setup.model
    for _, layer in adapters.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    model.train()
    ids = torch.randint(3, 500, (2, 9))
    labels = torch.tensor([0, 1])

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    plain = grads()
    enable_activation_checkpointing(model)
    with SavedTensorMeter(model) as checkpointed_meter:
        model(input_ids=ids, labels=labels)
    torch.manual_seed(0)
    checkpointed = grads()
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    with SavedTensorMeter(model) as plain_meter:
        model(input_ids=ids, labels=labels)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name])
    assert checkpointed_meter.bytes < plain_meter.bytes


def test_gradient_checkpointing_through_a_run_saves_activations_and_trains_the_same(make_cfg):
    """`train.gradient_checkpointing=true` as a user sets it: same result, fewer bytes kept for backward."""
    row_cfg = make_cfg()
    plain = run(make_cfg("variant.dropout=0.0", "sweep_name=plain"))
    checkpointed = run(make_cfg("variant.dropout=0.0", "train.gradient_checkpointing=true", "sweep_name=ckpt"))
    assert plain["status"] == checkpointed["status"] == "ok", checkpointed["error"]
    assert checkpointed["saved_activation_bytes"] < plain["saved_activation_bytes"]
    assert checkpointed["score_last"] == pytest.approx(plain["score_last"])
    assert checkpointed["metric_accuracy"] == pytest.approx(plain["metric_accuracy"])
    losses = [pd.read_parquet(rows.artifacts_dir(row_cfg.results_dir, name, row["run_key"]) / "history.parquet")
              ["train_loss"] for name, row in (("plain", plain), ("ckpt", checkpointed))]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_schedule_steps_from_ratio_and_from_epochs():
    cfg = OmegaConf.create({"grad_accum": 2, "max_steps": None, "epochs": 6, "warmup_epochs": 2,
                            "warmup_ratio": 0})
    assert schedule_steps(cfg, batches_per_epoch=10) == (30, 10, 5)  # the article: 2 epochs up, 4 down
    cfg = OmegaConf.merge(cfg, {"warmup_epochs": None, "warmup_ratio": 0.1, "max_steps": 50})
    assert schedule_steps(cfg, batches_per_epoch=10) == (50, 5, 5)


@pytest.mark.parametrize("override, key", [
    ("train.schedule=bogus", "train.schedule"), ("train.batch_size=0", "train.batch_size"),
    ("train.log_every_steps=0", "train.log_every_steps"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.max_steps=0", "train.max_steps"), ("train.eval_every_steps=0", "train.eval_every_steps"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"), ("train.warmup_epochs=1", "train.warmup_ratio"),
    ("train.lr=-1e-4", "train.lr"), ("train.head_lr=0", "train.head_lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.adam_betas=[0.9]", "train.adam_betas"), ("train.adam_eps=0", "train.adam_eps"),
    ("train.max_grad_norm=0", "train.max_grad_norm"), ("train.num_workers=-1", "train.num_workers"),
    ("train.gradient_checkpointing=sometimes", "train.gradient_checkpointing"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_train_values_fail_before_anything_is_loaded(make_cfg, override, key, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("validation must come before the model is built")

    monkeypatch.setattr("harness.models.load", no_model)
    with pytest.raises(ConfigError, match=f"{key}="):
        run(make_cfg(override, "train.warmup_ratio=0.06" if "warmup_epochs" in override else "seed=0"))


def test_selection_picks_the_best_eval_the_last_or_the_best_on_a_held_out_slice_of_train(make_cfg):
    common = ["task=rte", "train.max_steps=6", "train.eval_every_steps=1", "train.lr=5e-3", "save_adapter=false"]
    best = run(make_cfg(*common))
    assert best["selection"] == "eval_best" and best["score_selected"] == best["score_best"]
    assert best["selected_step"] == best["best_step"]
    last = run(make_cfg(*common, "train.selection=last"))
    assert last["score_selected"] == last["score_last"] and last["selected_step"] == 6
    heldout_cfg = make_cfg(*common, "train.selection=heldout", "data.selection_fraction=0.25")
    heldout = run(heldout_cfg)
    assert heldout["status"] == "ok", heldout.get("error")
    assert heldout["train_examples"] < best["train_examples"]  # the selection slice is not trained on
    folder = rows.artifacts_dir(heldout_cfg.results_dir, heldout_cfg.sweep_name, heldout["run_key"])
    history = pd.read_parquet(folder / "history.parquet")
    history = history[history["setting"].isna()] if "setting" in history else history
    chosen = history.loc[history["selection_score"].idxmax()]  # idxmax: the first of equals, as the trainer keeps
    assert heldout["selected_step"] == chosen["step"] and heldout["score_selected"] == chosen["score"]
    assert set(pd.read_parquet(folder / "predictions.parquet").checkpoint) == {"best", "last", "selected"}
    assert len({best["run_key"], last["run_key"], heldout["run_key"]}) == 3


def test_an_unknown_selection_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="train.selection"):
        validate_train(make_cfg("train.selection=best").train)
