"""The training loop, written out (`TrainingLoop`): AdamW with the variant's parameter groups, warmup then decay,
clipping, accumulation, autocast, evaluation after every epoch (and every N steps), and the meters behind the
results row's speed and memory columns. Also the checks of `train.*`, device and precision that run() makes
before anything loads, and `predict`, the evaluation forward in length order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harness.adapters.base import is_under
from harness.checkpoint import adapter_state
from harness.errors import ConfigError, Diverged, require
from harness.hardware import bf16_supported
from harness.meters import SavedTensorMeter, memory_account, peak_memory, reset_cpu_peak_rss
from harness.schedules import SCHEDULES, make_scheduler
from harness.trackers import Trackers

if TYPE_CHECKING:
    from harness.assemble import Assembled, Splits

log = logging.getLogger(__name__)

# Which evaluation's checkpoint a run reports as `score_selected`: the best on the reported split (the papers'
# protocol, optimistic), the last, or the best on a held-out slice of the training data (train.selection=heldout).
SELECTIONS = ("eval_best", "last", "heldout")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = [*PRECISIONS, "auto"]
MEGABATCH_BATCHES = 50  # train.group_by_length sorts within groups of this many batches (transformers' value)


# ---- device and precision ---------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:<n>") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but this machine has no CUDA device; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def concrete_precision(precision: str, device: torch.device) -> str:
    """`train.precision` with `auto` made concrete for `device`: bf16 where it is native, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_supported(device) else "fp32"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for fp32), or a ConfigError when the device cannot run it."""
    require(precision in PRECISION_CHOICES, "train.precision", precision, f"one of {PRECISION_CHOICES}")
    dtype = PRECISIONS[concrete_precision(precision, device)]
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device (this run is on {device.type}): "
                          "fp16 autocast with a grad scaler is a GPU feature; use fp32, or bf16 (CPU autocast)")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} does not support "
                          "bfloat16; use fp16 or fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---- what the loop produces --------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    """What a training run measured, filled in as it goes, so a run that fails midway still reports it."""

    history: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)  # "best", "last" and "selected"
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None  # the tensors at the selected evaluation (keep_best_state)
    last: dict[str, Any] | None = None
    selection: str = "eval_best"  # train.selection
    selected: dict[str, Any] | None = None  # the evaluation train.selection picks
    extra_scores: dict[str, float] = field(default_factory=dict)  # primary score per labelled eval setting, last eval
    steps: int = 0
    warmup_steps: int = 0
    epochs: float = 0.0
    train_seconds: float = 0.0
    train_samples: int = 0
    train_tokens: int = 0  # real (unpadded) tokens
    train_padded_tokens: int = 0  # token positions computed, padding included
    eval_seconds: float = 0.0
    eval_samples: int = 0
    eval_tokens: int = 0
    eval_padded_tokens: int = 0
    first_step_at: float | None = None  # time.time() when the first training batch was about to run
    memory: dict[str, Any] = field(default_factory=dict)


# ---- batches -----------------------------------------------------------------------------------------
def sequence_lengths(dataset) -> np.ndarray:
    """Each example's token count (its unpadded input_ids), in dataset order."""
    if hasattr(dataset, "with_format"):  # a datasets.Dataset: read the lengths from Arrow, not row by row
        import pyarrow.compute as pc

        column = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.array([len(example["input_ids"]) for example in dataset], dtype=np.int64)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Training batches of examples of similar length, in random order (`train.group_by_length`).

    Each epoch: shuffle the examples, cut them into megabatches of MEGABATCH_BATCHES batches, sort each
    megabatch by length and cut it into batches, then shuffle the order of all batches. Padding then costs a few
    percent instead of 1.5-3x, while every batch is still a random draw from its megabatch and the batch order is
    random (the scheme of transformers' LengthGroupedSampler and fairseq's size-ordered batches). All
    randomness comes from `generator`, so a seed gives the same batches in every run.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, generator: torch.Generator,
                 megabatch_batches: int = MEGABATCH_BATCHES):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.megabatch = batch_size * megabatch_batches
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).numpy()
        batches = []
        for start in range(0, len(order), self.megabatch):
            chunk = order[start:start + self.megabatch]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        for position in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[position]


def train_loader(train_set, collate, cfg, device: torch.device, seed: int) -> DataLoader:
    """Random batches, or length-grouped ones with `train.group_by_length`; either way fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    common = dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0)
    if cfg.get("group_by_length", False):
        batches = LengthGroupedBatches(sequence_lengths(train_set), cfg.batch_size, generator)
        return DataLoader(train_set, batch_sampler=batches, **common)
    return DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=False,
                      **common)


def padding_ratio(padded_tokens: int, real_tokens: int) -> float | None:
    """Token positions computed per real token (>= 1; 1.0 means no padding)."""
    return padded_tokens / real_tokens if real_tokens else None


# ---- the loop ----------------------------------------------------------------------------------------
def build_optimizer(model, variant, head: list[str], cfg) -> torch.optim.Optimizer:
    """AdamW over the variant's parameter groups, the task `head` split off at train.head_lr when it is set."""
    groups = variant.param_groups(model, cfg.lr, cfg.weight_decay)
    if cfg.head_lr is not None:
        groups = head_at_its_own_lr(groups, model, head, cfg.head_lr)
    if not groups:
        raise ConfigError(f"variant={variant.name!r} left no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def head_at_its_own_lr(groups: list[dict], model, head: list[str], head_lr: float) -> list[dict]:
    """The variant's groups with the task head's parameters split off at `head_lr`, keeping their weight decay:
    VeRA's recipe trains its 43K vector entries and the head at separate rates."""
    in_head = {id(param) for name, param in model.named_parameters() if is_under(name, head)}
    split = []
    for group in groups:
        head_params = [p for p in group["params"] if id(p) in in_head]
        rest = [p for p in group["params"] if id(p) not in in_head]
        split += [{**group, "params": rest},
                  {**group, "params": head_params, "lr": head_lr, "name": f"{group['name']}_head"}]
    return [group for group in split if group["params"]]


def learning_rates(optimizer: torch.optim.Optimizer) -> str:
    """The current rates for the log: one number, or one per distinct rate with its groups' names."""
    by_rate: dict[float, list[str]] = {}
    for group in optimizer.param_groups:
        by_rate.setdefault(group["lr"], []).append(group.get("name", "?"))
    if len(by_rate) == 1:
        return f"{next(iter(by_rate)):.3g}"
    return " ".join(f"{rate:.3g} ({'+'.join(names)})" for rate, names in by_rate.items())


def validate_train(cfg) -> None:
    """Check every `train.*` value before anything is loaded, so a typo fails in a second, not after the model
    and the tokenized data (minutes for SQuAD)."""
    require(cfg.schedule in SCHEDULES, "train.schedule", cfg.schedule, f"one of {sorted(SCHEDULES)}")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every_steps"):
        require(is_int(cfg[key]) and cfg[key] >= 1, f"train.{key}", cfg[key], "an integer >= 1")
    require(cfg.max_steps is None or (is_int(cfg.max_steps) and cfg.max_steps > 0), "train.max_steps",
            cfg.max_steps, "null or a positive integer")
    require(cfg.max_steps is not None or is_number(cfg.epochs) and cfg.epochs > 0, "train.epochs", cfg.epochs,
            "a positive number (or set train.max_steps)")
    require(cfg.eval_every_steps is None or (is_int(cfg.eval_every_steps) and cfg.eval_every_steps >= 1),
            "train.eval_every_steps", cfg.eval_every_steps, "null or an integer >= 1")
    if cfg.warmup_epochs is not None:
        require(is_number(cfg.warmup_epochs) and cfg.warmup_epochs >= 0, "train.warmup_epochs", cfg.warmup_epochs,
                "null or a number >= 0")
        require(not cfg.warmup_ratio, "train.warmup_ratio", cfg.warmup_ratio,
                "0 or null when train.warmup_epochs is set (give warmup one way)")
    else:
        ratio = cfg.warmup_ratio or 0
        require(is_number(ratio) and 0 <= ratio < 1, "train.warmup_ratio", cfg.warmup_ratio, "0 <= ratio < 1")
    require(is_number(cfg.lr) and cfg.lr > 0, "train.lr", cfg.lr, "a positive number")
    require(cfg.head_lr is None or (is_number(cfg.head_lr) and cfg.head_lr > 0), "train.head_lr", cfg.head_lr,
            "null (the head trains at train.lr) or a positive number")
    require(is_number(cfg.weight_decay) and cfg.weight_decay >= 0, "train.weight_decay", cfg.weight_decay,
            "a number >= 0")
    betas = list(cfg.adam_betas) if OmegaConf.is_list(cfg.adam_betas) else cfg.adam_betas
    require(isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
            "train.adam_betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    require(is_number(cfg.adam_eps) and cfg.adam_eps > 0, "train.adam_eps", cfg.adam_eps, "a positive number")
    require(cfg.max_grad_norm is None or (is_number(cfg.max_grad_norm) and cfg.max_grad_norm > 0),
            "train.max_grad_norm", cfg.max_grad_norm, "null (no clipping) or a positive number")
    require(is_int(cfg.num_workers) and cfg.num_workers >= 0, "train.num_workers", cfg.num_workers,
            "an integer >= 0")
    require(isinstance(cfg.gradient_checkpointing, bool), "train.gradient_checkpointing",
            cfg.gradient_checkpointing, "true or false")
    require(isinstance(cfg.get("group_by_length", False), bool), "train.group_by_length",
            cfg.get("group_by_length"), "true or false")
    require(cfg.get("selection", "eval_best") in SELECTIONS, "train.selection", cfg.get("selection"),
            f"one of {SELECTIONS}: the best evaluation on the reported split (the papers'), the last, or the best "
            "on a held-out slice of the training data (data.selection_fraction)")
    # train.precision: resolve_precision, which also knows the device


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def schedule_steps(cfg, batches_per_epoch: int) -> tuple[int, int, int]:
    """(total optimizer steps, warmup steps, steps per epoch) from epochs/max_steps and the warmup setting."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
    if cfg.max_steps is not None:
        total = int(cfg.max_steps)
    else:
        total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.warmup_epochs is not None:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    else:
        warmup = round((cfg.warmup_ratio or 0) * total)
    return total, min(warmup, total), steps_per_epoch


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in backward instead of keeping them (`train.gradient_checkpointing`).

    Non-reentrant checkpointing works when no input requires grad, which is the frozen-base case.
    transformers 5 renamed the switch (the old name warns); 4.x has only the old one.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class TrainingLoop:
    """One training run of an assembled model (`harness.assemble`), written out: AdamW over the variant's groups,
    warmup then decay, accumulation, clipping, autocast, the variant's step hooks, evaluation after every epoch
    (and every `train.eval_every_steps`), and the meters behind the row's speed and memory columns.

    `run()` trains the model in place and returns the outcome. `outcome` exists from construction and fills in as
    training goes, so a run that stops midway (out of memory, diverged, interrupted) can still write a row with
    what it reached. `cfg` is `train.*` and has passed `validate_train`. With train.selection=heldout,
    `data.selection` is scored at every evaluation too and picks the selected one. `keep_best_state` copies the
    trained tensors at each newly selected evaluation (to save them as adapter_best). `tracker` receives the
    loss, learning rates and scores as they come.
    """

    def __init__(self, setup: Assembled, data: Splits, cfg, device: torch.device, seed: int,
                 tracker: Trackers | None = None, keep_best_state: bool = False):
        self.setup, self.data, self.cfg, self.device, self.seed = setup, data, cfg, device, seed
        self.tracker = tracker if tracker is not None else Trackers()
        self.keep_best_state = keep_best_state
        self.collate = setup.task.collate(setup.tokenizer)
        self.amp_dtype = resolve_precision(cfg.precision, device)
        self.outcome = TrainOutcome(selection=cfg.get("selection", "eval_best"))
        # The last checks before training (the schedule against the variant, the optimizer's groups) run here, so
        # that a ConfigError comes before the run touches its folder (harness.run.discard_earlier_attempt).
        self.loader = train_loader(data.train, self.collate, cfg, device, seed)
        self.total_steps, self.outcome.warmup_steps, self.steps_per_epoch = schedule_steps(cfg, len(self.loader))
        setup.variant.check_schedule(self.total_steps)
        self.optimizer = build_optimizer(setup.model, setup.variant, setup.head, cfg)

    def run(self) -> TrainOutcome:
        cfg, outcome, model, variant = self.cfg, self.outcome, self.setup.model, self.setup.variant
        loader, optimizer = self.loader, self.optimizer
        total_steps, warmup, steps_per_epoch = self.total_steps, outcome.warmup_steps, self.steps_per_epoch
        scheduler = make_scheduler(optimizer, cfg.schedule, warmup, total_steps)
        # fp16 needs loss scaling; trainable parameters stay fp32 either way (autocast casts per op).
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        variant_state = variant.start_training(model, self.seed)  # this run's variant state (DyLoRA's rank draws)
        self.reset_peak_memory()
        log.info("training %d steps (%d per epoch, warmup %d) on %s", total_steps, steps_per_epoch, warmup, self.device)

        step = 0
        progress = tqdm(total=total_steps, disable=not sys.stderr.isatty(), desc="train", dynamic_ncols=True)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        clock = time.perf_counter()
        running_loss, running_n = 0.0, 0
        outcome.first_step_at = time.time()
        for epoch in range(math.ceil(total_steps / steps_per_epoch)):
            for i, batch in enumerate(loader):
                if i % cfg.grad_accum == 0:
                    variant.before_step(model, step, variant_state)
                running_loss += self.forward_backward(batch, scaler, step, epoch, measure=step == 0 and i == 0)
                running_n += 1
                end_of_epoch = i + 1 == len(loader)
                if (i + 1) % cfg.grad_accum and not end_of_epoch:
                    continue
                self.optimizer_step(optimizer, scaler, scheduler)
                variant.after_step(model, step, variant_state)
                step += 1
                outcome.steps = step
                if step == 1:
                    outcome.memory.update(memory_account(model, optimizer))
                progress.update(1)
                if step % cfg.log_every_steps == 0:
                    log.info("step %d/%d loss %.4f lr %s", step, total_steps, running_loss / running_n,
                             learning_rates(optimizer))
                    self.tracker.log_train(step, running_loss / running_n, optimizer.param_groups,
                                           outcome.train_samples, outcome.train_tokens,
                                           outcome.train_seconds + time.perf_counter() - clock)
                done = step >= total_steps
                if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or end_of_epoch or done:
                    outcome.train_seconds += time.perf_counter() - clock
                    outcome.epochs = step / steps_per_epoch
                    train_loss = running_loss / max(running_n, 1)
                    running_loss, running_n = 0.0, 0
                    self.evaluate_and_record(step, train_loss)
                    model.train()
                    clock = time.perf_counter()
                if done:
                    break
            if step >= total_steps:
                break
        progress.close()
        outcome.memory.update(peak_memory(self.device))
        return outcome

    def reset_peak_memory(self) -> None:
        """Start the peak-memory meters here, so the row's peaks are training's, not loading's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_cpu_peak_rss()

    def forward_backward(self, batch: dict, scaler, step: int, epoch: int, measure: bool) -> float:
        """The loss of one batch, backpropagated (scaled for accumulation) and counted in the throughput meters;
        `measure`: also count the bytes autograd saves for backward (the row's saved_activation_bytes)."""
        cfg, outcome, model = self.cfg, self.outcome, self.setup.model
        mask = batch["attention_mask"]  # counted on the host, before the copy: no device sync for the meters
        outcome.train_samples += mask.shape[0]
        outcome.train_tokens += int(mask.sum())
        outcome.train_padded_tokens += mask.numel()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        meter = SavedTensorMeter(model) if measure else contextlib.nullcontext()
        with meter:
            with autocast(self.device, self.amp_dtype):
                loss = model(**self.setup.task.model_inputs(batch, training=True)).loss
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} at step {step} (epoch {epoch}); "
                               + divergence_hint(cfg.precision))
            scaler.scale(loss / cfg.grad_accum).backward()
        if isinstance(meter, SavedTensorMeter):
            outcome.memory["saved_activation_bytes"] = meter.bytes
            outcome.memory["activation_batch_shape"] = "x".join(map(str, batch["input_ids"].shape))
        return loss.item()

    def optimizer_step(self, optimizer, scaler, scheduler) -> None:
        """Clip (train.max_grad_norm), step, advance the schedule, clear the gradients."""
        if self.cfg.max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           self.cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str | None, tuple[dict[str, float], pd.DataFrame]]:
        """{setting label: (metrics over every eval split, predictions)}; the unlabelled setting is the model as
        trained (its cost goes to the row's eval meters), labelled ones are the variant's (DyLoRA's ranks)."""
        setup, outcome = self.setup, self.outcome
        scored = {}
        for label, setting in setup.variant.eval_settings(setup.model):
            metrics, frames = {}, []
            with setting:
                for split, dataset in self.data.evals.items():
                    predicted = predict(setup.model, setup.task, dataset, self.collate, self.cfg, self.device,
                                        self.amp_dtype)
                    if label is None:
                        outcome.eval_samples += predicted.examples
                        outcome.eval_seconds += predicted.seconds
                        outcome.eval_tokens += predicted.tokens
                        outcome.eval_padded_tokens += predicted.padded_tokens
                    split_metrics, predictions = setup.task.score(split, dataset, predicted.outputs)
                    metrics.update(split_metrics)
                    frames.append(predictions)
            scored[label] = (metrics, pd.concat(frames, ignore_index=True))
        return scored

    def evaluate_and_record(self, step: int, train_loss: float) -> None:
        """Evaluate, append to the history, and update the last, best and selected evaluations."""
        outcome, task = self.outcome, self.setup.task
        scored = self.evaluate()
        metrics, predictions = scored[None]
        score = metrics[task.primary_metric]
        entry = {"step": step, "epoch": outcome.epochs, "train_loss": train_loss, "score": score, **metrics}
        if self.data.selection is not None:
            entry["selection_score"] = self.selection_score()
        outcome.history.append(entry)
        for label, (setting_metrics, _) in scored.items():
            if label is not None:
                outcome.extra_scores[label] = setting_metrics[task.primary_metric]
                outcome.history.append({"step": step, "epoch": outcome.epochs, "setting": label,
                                        "score": setting_metrics[task.primary_metric], **setting_metrics})
        self.tracker.log_eval(step, outcome.epochs, {label: setting_metrics
                                                     for label, (setting_metrics, _) in scored.items()})
        log.info("eval step %d epoch %.2f: %s=%.4f %s", step, outcome.epochs, task.primary_metric, score,
                 {k: round(v, 4) for k, v in metrics.items()})
        outcome.last = entry
        outcome.predictions["last"] = predictions
        if outcome.best is None or better(score, outcome.best["score"]):
            outcome.best = entry
            outcome.predictions["best"] = predictions
        if is_selected(entry, outcome):
            outcome.selected = entry
            outcome.predictions["selected"] = predictions
            if self.keep_best_state and outcome.selection != "last":  # the last state is the model as it ends
                outcome.best_state = adapter_state(self.setup.model, self.setup.variant)

    @torch.inference_mode()
    def selection_score(self) -> float:
        """The primary metric on the held-out slice of the training data (the model as trained, no variant setting)."""
        task = self.setup.task
        outputs, _, _ = predict(self.setup.model, task, self.data.selection, self.collate, self.cfg, self.device,
                                self.amp_dtype)
        metrics, _ = task.score(task.eval_splits[0], self.data.selection, outputs)
        return metrics[task.primary_metric]


def divergence_hint(precision: str) -> str:
    """What to try after a non-finite loss: fp32 only helps a run that is not in fp32 already."""
    return "lower train.lr" + ("" if precision == "fp32" else f" or use train.precision=fp32 (this run: {precision})")


# ---- evaluation --------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Per-example outputs in dataset order, and what computing them took."""

    outputs: dict[str, np.ndarray]
    examples: int
    seconds: float
    tokens: int  # real tokens
    padded_tokens: int  # token positions computed, padding included

    def __iter__(self):  # (outputs, examples, seconds), as callers unpack it
        return iter((self.outputs, self.examples, self.seconds))


EVAL_BATCH_LENGTH_SPREAD = 0.9  # an evaluation batch ends before an example shorter than this x its longest


def longest_first(dataset, batch_size: int) -> list[list[int]]:
    """Batches of dataset positions sorted by length, longest first, so that a batch that does not fit in memory
    fails at the first one. A batch holds up to `batch_size` examples and none shorter than
    EVAL_BATCH_LENGTH_SPREAD x its first: at most ~11% padding per batch (batches of a fixed count would pad the
    long tail by 15-25%), for a few more, smaller batches."""
    lengths = sequence_lengths(dataset)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        floor = EVAL_BATCH_LENGTH_SPREAD * lengths[order[start]]
        end = start + 1
        while end < len(order) and end - start < batch_size and lengths[order[end]] >= floor:
            end += 1
        batches.append(order[start:end].tolist())
        start = end
    return batches


@torch.inference_mode()
def predict(model, task, dataset, collate, cfg, device, amp_dtype, in_length_order: bool = True) -> Predictions:
    """Per-example outputs over `dataset`, in dataset order. Batches run longest first (`in_length_order=False`:
    in dataset order, which computes the same outputs with more padding)."""
    model.eval()
    if in_length_order:
        batches = longest_first(dataset, cfg.eval_batch_size)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers)
        order = np.concatenate([np.asarray(batch, dtype=np.int64) for batch in batches]) if batches else None
    else:
        loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate,
                            num_workers=cfg.num_workers)
        order = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {}
    tokens = padded_tokens = 0
    for batch in loader:
        tokens += int(batch["attention_mask"].sum())
        padded_tokens += batch["attention_mask"].numel()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            outputs = model(**task.model_inputs(batch, training=False))
        for key, value in task.batch_outputs(batch, outputs).items():
            parts.setdefault(key, []).append(value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    merged = {key: np.concatenate(values) if values[0].ndim else np.array(values) for key, values in parts.items()}
    if order is not None:  # back to dataset order: position order[j] holds the j-th computed output
        restored = np.empty_like(order)
        restored[order] = np.arange(len(order))
        merged = {key: value[restored] if value.ndim and len(value) == len(order) else value
                  for key, value in merged.items()}
    return Predictions(merged, len(dataset), seconds, tokens, padded_tokens)


def is_selected(entry: dict[str, Any], outcome: TrainOutcome) -> bool:
    """Whether this evaluation replaces the selected one: always for `last`; for `eval_best` a better score on
    the reported split, for `heldout` a better score on the selection slice (the first of equals stays)."""
    if outcome.selection == "last" or outcome.selected is None:
        return True
    key = "selection_score" if outcome.selection == "heldout" else "score"
    return better(entry[key], outcome.selected[key])


def better(score: float, best: float) -> bool:
    """Higher is better for every metric we select on; NaN (a constant prediction's correlation) never wins."""
    return not math.isnan(score) and (math.isnan(best) or score > best)
