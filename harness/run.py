"""One run, start to finish: config -> seeded model with adapters -> training -> one results row.

`run(cfg)` is pure with respect to Hydra (tests call it with a composed config). Whatever happens, a row
is written with the run's status; a run whose row already says `ok` is skipped, which is how sweeps resume.
"""

from __future__ import annotations

import contextlib
import sys
import datetime as dt
import json
import logging
import math
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from harness import adapters, metrics, models, results, tasks, trackers, warm_start
from harness.checkpoint import save_adapter
from harness.errors import ConfigError, Diverged, HarnessError, NoScore, require
from harness.sweep import lifecycle
from harness.train import (TrainOutcome, concrete_precision, padding_ratio, resolve_device, resolve_precision, train,
                           validate_train)

log = logging.getLogger(__name__)

if not sys.stderr.isatty():  # progress bars only for people watching a terminal
    datasets.disable_progress_bars()


def count_parameters(model: torch.nn.Module, head: list[str]) -> dict[str, int]:
    """Trainable parameters with and without the task head (papers count without), the head, the total."""
    trainable = head_params = trainable_head = total = 0
    for name, param in model.named_parameters():
        n = param.numel()
        in_head = adapters.base.is_under(name, head)
        total += n
        head_params += n if in_head else 0
        if param.requires_grad:
            trainable += n
            trainable_head += n if in_head else 0
    # A quantized base (QLoRA) keeps its linear weights as packed codes that are not parameters (torchao) or
    # whose numel is the packed size (bitsandbytes): count those as the out x in matrices they stand for.
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            stored = dict(module.named_parameters(recurse=False)).get("weight")
            total += module.in_features * module.out_features - (stored.numel() if stored is not None else 0)
    return {"trainable_params": trainable, "trainable_params_no_head": trainable - trainable_head,
            "head_params": head_params, "total_params": total}


def base_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the encoder's linear weights as stored (QLoRA shrinks them)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            nbytes = getattr(weight, "storage_bytes", None)
            total += nbytes() if callable(nbytes) else adapters.base.weight_bytes(weight)
    return total


def validate_top_level(cfg: DictConfig) -> None:
    require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**32, "seed", cfg.seed,
            "an integer from 0 to 2**32 - 1 (numpy's seed range)")
    require(isinstance(cfg.sweep_name, str) and cfg.sweep_name and "/" not in cfg.sweep_name,
            "sweep_name", cfg.sweep_name, "a non-empty name without '/'")


def config_columns(cfg: DictConfig, key: str) -> dict[str, Any]:
    variant = cfg.variant
    return {
        "run_key": key, "sweep": cfg.sweep_name, "task": cfg.task.name, "variant": variant.name,
        "impl": variant.get("impl", "ours"), "seed": cfg.seed, "model": cfg.model.name,
        "rank": variant.get("r"), "alpha": variant.get("alpha"),
        "lr": cfg.train.lr, "schedule": cfg.train.schedule, "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum, "max_steps": cfg.train.max_steps, "max_seq_len": cfg.task.max_seq_len,
        "precision": cfg.train.precision, "init_from": cfg.get("init_from"),
        "config_json": json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str),
        "versions_json": json.dumps(results.library_versions()),
    }


def process_start_time() -> float | None:
    """When this process started (time.time() scale), so that the first run in it is charged its imports;
    None where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as handle:
            started_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_charged_process_start = False


def run_start_time() -> float:
    """The start of this run's wall clock: the process's start for its first run (imports and interpreter start
    belong to it), the call itself for later runs in the same process (a sweep worker)."""
    global _charged_process_start
    now = time.time()
    started = None if _charged_process_start else process_start_time()
    _charged_process_start = True
    return started if started is not None and started <= now else now


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration and return its results row (as a dict)."""
    started = run_start_time()
    cfg = warm_start.resolve(cfg)  # init_from=task=<name> -> the source's run_key, part of this run's key
    key = results.run_key(cfg)
    existing = results.read_row(results.row_path(cfg.results_dir, cfg.sweep_name, key))
    if results.is_done(existing):
        log.info("skip %s: run %s already has an ok row", describe(cfg), key)
        warn_if_measured_elsewhere(existing, cfg.device)
        return existing
    trackers.check_installed(cfg)  # a missing tracker package stops the run here, before it has a row
    results.check_writable(cfg.results_dir, cfg.sweep_name)
    row = config_columns(cfg, key)
    row["data_fingerprint"] = results.data_fingerprint(cfg)
    row["git_sha"], row["git_dirty"] = results.git_state()
    row["started_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    outcome = TrainOutcome(keep_best_state=bool(cfg.save_adapter))
    outcome.started_at = started
    artifacts = results.artifacts_dir(cfg.results_dir, cfg.sweep_name, key)
    shutil.rmtree(artifacts, ignore_errors=True)  # an earlier failed attempt's history must not pass for this one's
    model = variant = None
    log.info("run %s: %s", key, describe(cfg))
    try:
        with lifecycle.interruptible():  # a stop signal may cut the run here (under lifecycle.run_guard)
            outcome.tracker = trackers.Trackers.start(cfg, key, describe(cfg))
            row["tracker_run_ids"] = outcome.tracker.run_ids()
            validate_top_level(cfg)
            validate_train(cfg.train)
            device = resolve_device(cfg.device)
            resolve_precision(cfg.train.precision, device)
            row["precision"] = concrete_precision(cfg.train.precision, device)  # what auto chose
            row["device"] = describe_device(device)
            source = warm_start.source_checkpoint(cfg)[0] if cfg.get("init_from") else None  # before loading anything
            variant = adapters.build(cfg.variant)
            variant.device = device
            task = tasks.get(cfg.task, cfg.data)
            row["primary_metric"] = task.primary_metric
            row["protocol"] = task.protocol_description()
            transformers.set_seed(cfg.seed)  # before any module is built: head and adapter inits are seeded
            loaded = models.load(cfg.model, task.head_kind, task.num_labels, cfg.data.cache_dir)
            model = loaded.model
            targeted = variant.prepare(model, loaded.head)
            if source is not None:
                loaded_names = warm_start.load_source_adapter(model, loaded.head, source)
                log.info("init_from %s: %d adapter tensors from %s", cfg.init_from, len(loaded_names), source)
            row.update(count_parameters(model, loaded.head), targeted_modules=len(targeted),
                       targets=",".join(targeted), base_weight_bytes=base_weight_bytes(model))
            row["extra_json"] = json.dumps(variant.facts(model))
            model.to(device)
            train_set, eval_sets = task.datasets(loaded.tokenizer, cfg.seed)
            selection_set = None
            if cfg.train.get("selection", "eval_best") == "heldout":  # a slice of train picks the checkpoint
                train_set, selection_set = task.selection_split(train_set)
                log.info("train.selection=heldout: %d training rows pick the checkpoint, %d train",
                         len(selection_set), len(train_set))
            row["train_examples"] = len(train_set)
            row["eval_examples"] = sum(len(d) for d in eval_sets.values())
            row["batch_size"] = batch_size_that_runs(cfg.train.batch_size, len(train_set))
            with watch_eval_outputs(model) as watch:
                train(model, task, train_set, eval_sets, task.collate(loaded.tokenizer), variant, cfg.train,
                      device, cfg.seed, outcome, selection_set=selection_set)
            check_finite(model, outcome, watch, task.primary_metric)
            if cfg.save_adapter:
                row["adapter_bytes"] = save_adapter(model, variant, artifacts / "adapter.safetensors")
                # adapter_best: the selected evaluation's tensors (train.selection), when it is not the last
                if outcome.selected is not None and outcome.selected["step"] != outcome.last["step"]:
                    save_adapter(model, variant, artifacts / "adapter_best.safetensors", outcome.best_state)
                variant.save_other_formats(model, artifacts)
            row["status"] = "ok"
    except KeyboardInterrupt as err:  # Interrupted (SIGTERM, SIGINT) is one
        row.update(status="interrupted", error=f"{type(err).__name__}: {err}")
        finish(cfg, row, outcome, artifacts)  # further signals are ignored now (lifecycle.run_guard)
        raise
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="oom", error=f"CUDA out of memory: {str(err).splitlines()[0]}")
    except Diverged as err:
        row.update(status="diverged", error=str(err))
    except NoScore as err:
        row.update(status="failed", error=str(err))
    except HarnessError as err:
        if outcome.steps == 0:  # bad config, data or environment, found before training: an error, not a run
            raise
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the traceback goes to the log
        log.error("run %s failed:\n%s", key, traceback.format_exc())
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
    with lifecycle.stops_held():  # the row is written whole; a stop signal waits for it
        finish(cfg, row, outcome, artifacts)
    return row


def batch_size_that_runs(batch_size: int, train_examples: int) -> int:
    """The batch size the loop actually uses: a training set smaller than train.batch_size is one batch."""
    if batch_size > train_examples:
        log.warning("train.batch_size=%d but the training set has %d examples: every step uses those %d, and the "
                    "row says batch_size=%d", batch_size, train_examples, train_examples, train_examples)
    return min(batch_size, train_examples)


@contextlib.contextmanager
def watch_eval_outputs(model: torch.nn.Module):
    """Record the first evaluation forward whose outputs (logits, span scores) hold NaN or inf: an argmax over NaN
    logits is class 0, a plausible-looking score, so the outputs themselves must be checked. Yields a dict that
    gets `first_bad` (a description) set."""
    watch: dict[str, str] = {}
    evaluations = [0]

    def check(module, args, output):
        if module.training or "first_bad" in watch:
            return
        evaluations[0] += 1
        values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
        for name, value in zip(output.keys() if isinstance(output, dict) else range(len(values)), values):
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                watch["first_bad"] = f"evaluation batch {evaluations[0]}: {name} holds NaN or inf"
                return

    handle = model.register_forward_hook(check)
    try:
        yield watch
    finally:
        handle.remove()


def check_finite(model: torch.nn.Module, outcome: TrainOutcome, watch: dict[str, str], primary_metric: str) -> None:
    """After training: Diverged when a parameter or an evaluation output is NaN or infinite (divergence in the
    last step is seen by no further loss), NoScore when the outputs are finite but a score is not (the
    correlation of a constant prediction). Either way the run is not `ok`."""
    for name, param in model.named_parameters():
        try:
            finite = bool(torch.isfinite(param).all()) if param.is_floating_point() else True
        except (RuntimeError, NotImplementedError, TypeError):  # a quantized tensor subclass: its codes are ints
            finite = True
        if not finite:
            raise Diverged(f"after {outcome.steps} steps, parameter {name} holds NaN or inf; "
                           "lower train.lr (or raise train.warmup_ratio)")
    if "first_bad" in watch:
        raise Diverged(f"after {outcome.steps} steps, the model's outputs are not finite ({watch['first_bad']}); "
                       "lower train.lr")
    bad = {k: v for entry in (outcome.best, outcome.last) if entry for k, v in entry.items()
           if k not in ("step", "epoch", "train_loss") and isinstance(v, float) and not math.isfinite(v)}
    if outcome.best is None or bad:
        raise NoScore(f"the evaluation scores {bad or {primary_metric: None}} are undefined (a correlation is NaN "
                      "when every prediction is the same): the model did not learn to tell examples apart; "
                      "try more steps or another train.lr")


def finish(cfg: DictConfig, row: dict[str, Any], outcome: TrainOutcome, artifacts: Path) -> None:
    """Fill the score, speed and memory columns from what was measured, write the sibling files, then the row."""
    row["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if outcome.best is not None:
        metric_values = {k: v for k, v in outcome.best.items()
                         if k not in ("step", "epoch", "train_loss", "score", "selection_score")}
        unknown = set(metric_values) - set(results.METRIC_NAMES)
        if unknown:
            raise KeyError(f"task metrics {sorted(unknown)} have no results column; add them to results.METRIC_NAMES")
        row.update({f"metric_{k}": v for k, v in metric_values.items()})
        row.update(score_best=outcome.best["score"], best_epoch=outcome.best["epoch"], best_step=outcome.best["step"],
                   score_last=outcome.last["score"], last_metrics_json=json.dumps(
                       {k: v for k, v in outcome.last.items() if k not in ("train_loss",)}))
        row.update(selection=outcome.selection, score_selected=outcome.selected["score"],
                   selected_step=outcome.selected["step"],
                   degenerate=metrics.constant_predictions(outcome.predictions.get("selected")))
    if outcome.setting_scores:
        row["rank_scores_json"] = json.dumps(outcome.setting_scores)
    row.update(steps=outcome.steps, epochs=outcome.epochs, warmup_steps=outcome.warmup_steps,
               train_seconds=outcome.train_seconds, eval_seconds=outcome.eval_seconds, **outcome.memory)
    if outcome.train_seconds > 0:
        row["train_samples_per_s"] = outcome.train_samples / outcome.train_seconds
        row["train_tokens_per_s"] = outcome.train_tokens / outcome.train_seconds
    if outcome.eval_seconds > 0:
        row["eval_samples_per_s"] = outcome.eval_samples / outcome.eval_seconds
    row["train_padding_ratio"] = padding_ratio(outcome.train_padded_tokens, outcome.train_tokens)
    row["eval_padding_ratio"] = padding_ratio(outcome.eval_padded_tokens, outcome.eval_tokens)
    if outcome.first_step_at is not None:
        row["setup_seconds"] = outcome.first_step_at - outcome.started_at
    row.setdefault("status", "failed")
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if outcome.history:
        results.atomic_write_parquet(pd.DataFrame(outcome.history), artifacts / "history.parquet")
    if outcome.predictions:
        frames = [df.assign(checkpoint=name) for name, df in outcome.predictions.items()
                  if name != "selected" or outcome.selection == "heldout"]  # eval_best's is "best", last's "last"
        results.atomic_write_parquet(pd.concat(frames, ignore_index=True), artifacts / "predictions.parquet")
    row["wall_seconds"] = time.time() - outcome.started_at  # up to the row's writing, the history's included
    path = results.write_row(cfg.results_dir, cfg.sweep_name, row)
    outcome.tracker.close(row)
    score = row.get("score_best")
    log.info("run %s %s: %s=%s -> %s", row["run_key"], row["status"], row.get("primary_metric"),
             "none" if score is None else f"{score:.4f}", path)


def describe(cfg: DictConfig) -> str:
    rank = cfg.variant.get("r")
    return (f"task={cfg.task.name} variant={cfg.variant.name}" + (f" r={rank}" if rank is not None else "")
            + f" model={cfg.model.name} seed={cfg.seed}")


def warn_if_measured_elsewhere(existing: dict[str, Any], device_name: str) -> None:
    """The run_key leaves the device out (a config scores the same, to float noise, anywhere), so a sweep resumed
    on other hardware keeps rows whose speed and memory were measured elsewhere: say so, rather than mix devices
    silently."""
    try:
        here = describe_device(resolve_device(device_name))
    except ConfigError:
        return
    measured_on = existing.get("device") or ""
    if measured_on and device_kind(measured_on) != device_kind(here):
        log.warning("run %s is kept as it is: its ok row was measured on %s, but this sitting runs on %s, so its "
                    "throughput and memory columns describe %s. To measure on this device, run with another "
                    "sweep_name (or results_dir).", existing["run_key"], measured_on, here, measured_on)


def device_kind(description: str) -> str:
    """What speed and memory depend on: the GPU model ('cuda:NVIDIA A100-SXM4-80GB'), or just 'cpu' (thread count
    and host vary between the sittings of one CPU sweep)."""
    return description if description.startswith("cuda") else description.split(":")[0]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads@{socket.gethostname()}"
