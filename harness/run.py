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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from harness import metrics, rows, run_keys, trackers, warm_start
from harness.assemble import Assembled, Splits, assemble, base_weight_bytes, parameter_counts, read_splits
from harness.atomic import atomic_write_parquet
from harness.checkpoint import save_adapter
from harness.errors import ConfigError, Diverged, HarnessError, NoScore, require
from harness.sweep import lifecycle
from harness.train import (TrainingLoop, TrainOutcome, concrete_precision, padding_ratio, resolve_device,
                           resolve_precision, validate_train)

log = logging.getLogger(__name__)

if not sys.stderr.isatty():  # progress bars only for people watching a terminal
    datasets.disable_progress_bars()


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
        "versions_json": json.dumps(rows.library_versions()),
    }


def process_start_time() -> float | None:
    """When this process started (time.time() scale), so that the first run in it is charged its imports;
    None where /proc cannot tell. The process's age is the system's uptime less its start in clock ticks since
    boot, both to 10 ms. The boot time in /proc/stat (`btime`) is whole seconds, up to a second early; it is the
    fallback where the uptime disagrees with it (LXCFS gives a container its own uptime, not the host's ticks)."""
    try:
        with open("/proc/self/stat") as handle:
            since_boot = int(handle.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    from_uptime, from_boot = time.time() - (uptime - since_boot), boot + since_boot
    return from_uptime if from_boot - 0.05 <= from_uptime <= from_boot + 1.05 else from_boot


_charged_process_start = False
_left_out_seconds = 0.0


def leave_out_of_first_run(seconds: float) -> None:
    """Time this process spent on work that is not its first run's (a sweep composing and checking its whole grid
    before running its jobs in this process): that run's clock starts at the process's start, to charge it the
    imports, and leaves this out."""
    global _left_out_seconds
    _left_out_seconds += seconds


def run_start_time() -> float:
    """The start of this run's wall clock: the process's start for its first run (imports and interpreter start
    belong to it, what `leave_out_of_first_run` was told does not), the call itself for later runs in the same
    process (a sweep worker)."""
    global _charged_process_start
    now = time.time()
    started = None if _charged_process_start else process_start_time()
    _charged_process_start = True
    if started is not None:
        started += _left_out_seconds
    return started if started is not None and started <= now else now


@dataclass
class Attempt:
    """What one run has reached so far, so that every way it ends writes a row from it: when it started, its
    artifacts folder, the row an earlier attempt left (and whether it is gone yet), its tracker, what was
    assembled, and the training loop (whose outcome holds what training measured, up to a failure)."""

    started: float
    artifacts: Path
    earlier: dict[str, Any] | None = None
    discarded: bool = False
    tracker: trackers.Trackers = field(default_factory=trackers.Trackers)
    setup: Assembled | None = None
    loop: TrainingLoop | None = None

    @property
    def outcome(self) -> TrainOutcome:
        return self.loop.outcome if self.loop is not None else TrainOutcome()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration and return its results row (as a dict)."""
    started = run_start_time()
    cfg = warm_start.resolve(cfg)  # init_from=task=<name> -> the source's run_key, part of this run's key
    key = run_keys.run_key(cfg)
    existing = rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, key))
    weights = run_keys.model_fingerprint(cfg)
    if rows.is_done(existing) and rows.made_with_other_weights(existing, weights):
        log.warning("run %s: its ok row loaded other files from %s (model fingerprint %s, now %s): running it again",
                    key, cfg.model.source, existing["model_fingerprint"], weights)
    elif rows.is_done(existing) and not cfg.get("rerun"):
        log.info("skip %s: run %s already has an ok row", describe(cfg), key)
        warn_if_measured_elsewhere(existing, cfg.device, cfg.train.precision)
        return existing
    trackers.check_installed(cfg)  # a missing tracker package stops the run here, before it has a row
    rows.check_writable(cfg.results_dir, cfg.sweep_name)
    row = identity_columns(cfg, key)
    row["model_fingerprint"] = weights
    attempt = Attempt(started, rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, key), earlier=existing)
    log.info("run %s: %s", key, describe(cfg))
    try:
        with lifecycle.interruptible():  # a stop signal may cut the run here (under lifecycle.run_guard)
            device, source = check_before_loading(cfg, row)
            setup = attempt.setup = assemble(cfg, device)
            if source is not None:
                loaded_names = warm_start.load_source_adapter(setup.model, setup.head, source)
                log.info("init_from %s: %d adapter tensors from %s", cfg.init_from, len(loaded_names), source)
            row.update(setup_columns(setup))
            setup.model.to(device)
            splits = read_splits(cfg, setup)
            row.update(split_columns(splits, cfg.train.batch_size))
            attempt.loop = TrainingLoop(setup, splits, cfg.train, device, cfg.seed,  # its checks: schedule, optimizer
                                        keep_best_state=bool(cfg.save_adapter))
            discard_earlier_attempt(cfg, key, attempt)  # from here on, whatever happens, this attempt writes a row
            attempt.tracker = attempt.loop.tracker = trackers.Trackers.start(cfg, key, describe(cfg))  # in the folder
            row["tracker_run_ids"] = attempt.tracker.run_ids()
            outcome = train_and_check(attempt.loop)
            if cfg.save_adapter:
                row["adapter_bytes"] = save_artifacts(setup, outcome, attempt.artifacts)
            row["status"] = "ok"
    except KeyboardInterrupt as err:  # Interrupted (SIGTERM, SIGINT) is one
        row.update(status="interrupted", error=f"{type(err).__name__}: {err}")
        finish(cfg, row, attempt)  # further signals are ignored now (lifecycle.run_guard)
        raise
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="oom", error=f"CUDA out of memory: {str(err).splitlines()[0]}")
    except Diverged as err:
        row.update(status="diverged", error=str(err))
    except NoScore as err:
        row.update(status="failed", error=str(err))
    except HarnessError as err:
        if not attempt.discarded:  # bad config, data or environment, found before training: an error, not a run
            raise
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the traceback goes to the log
        log.error("run %s failed:\n%s", key, traceback.format_exc())
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
    with lifecycle.stops_held():  # the row is written whole; a stop signal waits for it
        finish(cfg, row, attempt)
    return row


def discard_earlier_attempt(cfg: DictConfig, key: str, attempt: Attempt) -> None:
    """Remove what an earlier attempt at this run left (a failed one's row and files, or the ok ones `rerun`
    replaces) before this attempt writes anything of its own: once it is about to train, or when it ends before
    that with a row (a crash, a stop signal). A config, data or environment error found before training leaves
    them as they were. The row goes first, so a run killed outright from here on leaves no row and is run again,
    never an old ok row without its files; and no earlier history or adapter can pass for this attempt's."""
    if attempt.discarded:
        return
    if attempt.earlier is not None:
        log.info("run %s: replacing its earlier %s row and files", key, attempt.earlier["status"])
        rows.row_path(cfg.results_dir, cfg.sweep_name, key).unlink(missing_ok=True)
    shutil.rmtree(attempt.artifacts, ignore_errors=True)
    attempt.discarded = True


def identity_columns(cfg: DictConfig, key: str) -> dict[str, Any]:
    """The row's columns known before anything runs: the config, the data fingerprint, the code, the start (the
    model's fingerprint is `run`'s, which compares it with the earlier row's first)."""
    row = config_columns(cfg, key)
    row["data_fingerprint"] = run_keys.data_fingerprint(cfg)
    row["git_sha"], row["git_dirty"] = rows.git_state()
    row["started_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return row


def check_before_loading(cfg: DictConfig, row: dict[str, Any]) -> tuple[torch.device, Path | None]:
    """Everything that can be checked before a model loads (config values, the device and its precision, the
    init_from source's checkpoint): (the device, the source's adapter file or None). Fills precision and device."""
    validate_top_level(cfg)
    validate_train(cfg.train)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.train.precision, device)
    row["precision"] = concrete_precision(cfg.train.precision, device)  # what auto chose
    row["device"] = describe_device(device)
    source = warm_start.source_checkpoint(cfg)[0] if cfg.get("init_from") else None
    return device, source


def setup_columns(setup: Assembled) -> dict[str, Any]:
    """The row's columns about what was assembled: the task's metric and protocol, sizes, targets, facts."""
    return {"primary_metric": setup.task.primary_metric, "protocol": setup.task.protocol_description(),
            **parameter_counts(setup.model, setup.head), "targeted_modules": len(setup.targeted),
            "targets": ",".join(setup.targeted), "base_weight_bytes": base_weight_bytes(setup.model),
            "extra_json": json.dumps(setup.facts)}


def split_columns(splits: Splits, batch_size: int) -> dict[str, Any]:
    return {"train_examples": len(splits.train), "eval_examples": sum(len(d) for d in splits.evals.values()),
            "batch_size": batch_size_that_runs(batch_size, len(splits.train))}


def train_and_check(loop: TrainingLoop) -> TrainOutcome:
    """Train; then Diverged or NoScore when the model or its scores are not finite (`check_finite`)."""
    with watch_eval_outputs(loop.setup.model) as watch:
        outcome = loop.run()
    check_finite(loop.setup.model, outcome, watch, loop.setup.task.primary_metric)
    return outcome


def save_artifacts(setup: Assembled, outcome: TrainOutcome, artifacts: Path) -> int:
    """The trained adapter and head (adapter.safetensors), the selected evaluation's when it is not the last
    (adapter_best.safetensors, per train.selection), and other tools' formats of the selected one, the checkpoint
    the row scores (the model is left at it); returns the adapter's bytes."""
    model, variant = setup.model, setup.variant
    adapter_bytes = save_adapter(model, variant, artifacts / "adapter.safetensors")
    if outcome.selected is not None and outcome.selected["step"] != outcome.last["step"]:
        save_adapter(model, variant, artifacts / "adapter_best.safetensors", outcome.best_state)
        model.load_state_dict(outcome.best_state, strict=False)
    variant.save_other_formats(model, artifacts, setup.head, setup.targeted)
    return adapter_bytes


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    """The predictions sorted by checkpoint, split and example, GLUE's integer ids stored as differences (MNLI's
    35k predictions: 27 KB instead of 122); the report pairs them by id, not by position."""
    keys = [c for c in ("checkpoint", "split", "idx", "id") if c in frame.columns]
    frame = frame.sort_values(keys, kind="stable", ignore_index=True)
    atomic_write_parquet(frame, path, delta_encoded=("idx",) if "idx" in frame.columns else ())


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
    bad = {k: v for entry in (outcome.best, outcome.last, outcome.selected) if entry for k, v in entry.items()
           if k not in ("step", "epoch", "train_loss") and isinstance(v, float) and not math.isfinite(v)}
    if outcome.best is None or bad:
        raise NoScore(f"the evaluation scores {bad or {primary_metric: None}} are undefined (a correlation is NaN "
                      "when every prediction is the same): the model did not learn to tell examples apart; "
                      "try more steps or another train.lr")


def finish(cfg: DictConfig, row: dict[str, Any], attempt: Attempt) -> None:
    """Fill the score, speed and memory columns from what was measured, write the sibling files, then the row."""
    outcome, artifacts = attempt.outcome, attempt.artifacts
    row["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    row.update(score_columns(outcome))
    if attempt.setup is not None:
        row.update(attempt.setup.variant.row_columns(outcome.extra_scores))
    row.update(speed_columns(outcome))
    if outcome.first_step_at is not None:
        row["setup_seconds"] = outcome.first_step_at - attempt.started
    row.setdefault("status", "failed")
    discard_earlier_attempt(cfg, row["run_key"], attempt)  # ended before training: never beside an earlier one's files
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if outcome.history:
        atomic_write_parquet(pd.DataFrame(outcome.history), artifacts / "history.parquet")
    if outcome.predictions:
        frames = [df.assign(checkpoint=name) for name, df in outcome.predictions.items()
                  if name != "selected" or outcome.selection == "heldout"]  # eval_best's is "best", last's "last"
        write_predictions(pd.concat(frames, ignore_index=True), artifacts / "predictions.parquet")
    row["wall_seconds"] = time.time() - attempt.started  # up to the row's writing, the history's included
    path = rows.write_row(cfg.results_dir, cfg.sweep_name, row)
    attempt.tracker.close(row)
    log.info("run %s %s: %s -> %s", row["run_key"], row["status"], score_summary(row), path)


def score_summary(row: dict[str, Any]) -> str:
    """The final log line's score: the selected checkpoint's (the one the row stands for), and the best evaluation's
    when that is another one (train.selection=heldout or last), so a log never shows a better number than the row."""
    metric, selected, best = row.get("primary_metric"), row.get("score_selected"), row.get("score_best")
    if selected is None:
        return f"{metric}=none"
    text = f"{metric}={selected:.4f}"
    if row.get("selection") != "eval_best":
        text += f" at the {row.get('selection')} checkpoint (step {row.get('selected_step')})"
        if best is not None and row.get("selected_step") != row.get("best_step"):
            text += f"; best evaluation {best:.4f} (step {row.get('best_step')})"
    return text


def score_columns(outcome: TrainOutcome) -> dict[str, Any]:
    """Best, last and selected scores, every task metric of the best evaluation, and whether the selected
    checkpoint predicts a constant; nothing before a first evaluation."""
    if outcome.best is None:
        return {}
    metric_values = {k: v for k, v in outcome.best.items()
                     if k not in ("step", "epoch", "train_loss", "score", "selection_score")}
    unknown = set(metric_values) - set(rows.METRIC_NAMES)
    if unknown:
        raise KeyError(f"task metrics {sorted(unknown)} have no results column; add them to rows.METRIC_NAMES")
    return {**{f"metric_{k}": v for k, v in metric_values.items()},
            "score_best": outcome.best["score"], "best_epoch": outcome.best["epoch"], "best_step": outcome.best["step"],
            "score_last": outcome.last["score"],
            "last_metrics_json": json.dumps({k: v for k, v in outcome.last.items() if k not in ("train_loss",)}),
            "selection": outcome.selection, "score_selected": outcome.selected["score"],
            "selected_step": outcome.selected["step"],
            "degenerate": metrics.constant_predictions(outcome.predictions.get("selected"))}


def speed_columns(outcome: TrainOutcome) -> dict[str, Any]:
    """Steps, seconds, throughput, padding and the memory meters."""
    columns = dict(steps=outcome.steps, epochs=outcome.epochs, warmup_steps=outcome.warmup_steps,
                   train_seconds=outcome.train_seconds, eval_seconds=outcome.eval_seconds, **outcome.memory)
    if outcome.train_seconds > 0:
        columns["train_samples_per_s"] = outcome.train_samples / outcome.train_seconds
        columns["train_tokens_per_s"] = outcome.train_tokens / outcome.train_seconds
    if outcome.eval_seconds > 0:
        columns["eval_samples_per_s"] = outcome.eval_samples / outcome.eval_seconds
    columns["train_padding_ratio"] = padding_ratio(outcome.train_padded_tokens, outcome.train_tokens)
    columns["eval_padding_ratio"] = padding_ratio(outcome.eval_padded_tokens, outcome.eval_tokens)
    return columns


def describe(cfg: DictConfig) -> str:
    rank = cfg.variant.get("r")
    return (f"task={cfg.task.name} variant={cfg.variant.name}" + (f" r={rank}" if rank is not None else "")
            + f" model={cfg.model.name} seed={cfg.seed}")


def warn_if_measured_elsewhere(existing: dict[str, Any], device_name: str, precision: str) -> None:
    """The run_key leaves the device out (a config scores the same, to float noise, anywhere) and holds
    `precision=auto` as written, so a sweep resumed on other hardware keeps rows whose speed and memory were
    measured elsewhere, or that `auto` computed in another precision than it would here: say so, rather than mix
    devices silently (the report refuses a cell whose seeds computed in two precisions)."""
    try:
        device = resolve_device(device_name)
    except ConfigError:
        return
    here = describe_device(device)
    measured_on = existing.get("device") or ""
    if measured_on and device_kind(measured_on) != device_kind(here):
        log.warning("run %s is kept as it is: its ok row was measured on %s, but this sitting runs on %s, so its "
                    "throughput and memory columns describe %s. To measure on this device, run with another "
                    "sweep_name (or results_dir).", existing["run_key"], measured_on, here, measured_on)
    computed_in, would_compute = existing.get("precision"), concrete_precision(precision, device)
    if computed_in and computed_in != would_compute:
        log.warning("run %s is kept as it is: its ok row computed in %s (train.precision=%s), which is %s on this "
                    "machine: the runs of this sitting would not compute as it did, and the report will not put "
                    "them in one cell. Resume on a machine where it is %s, or run this sitting with another "
                    "sweep_name.", existing["run_key"], computed_in, precision, would_compute, computed_in)


def device_kind(description: str) -> str:
    """What speed and memory depend on: the GPU model ('cuda:NVIDIA A100-SXM4-80GB'), or just 'cpu' (thread count
    and host vary between the sittings of one CPU sweep)."""
    return description if description.startswith("cuda") else description.split(":")[0]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads@{socket.gethostname()}"
