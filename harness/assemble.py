"""What a run is built from, built in one place: seed -> task -> model + tokenizer -> the variant prepared on it.

`assemble(cfg)` is what `run()`, `python -m harness.inspect`, the benchmarks and the tests call, so that every one
of them measures the model a run trains (same seed, same init order, same injection). `read_splits` then gives
the run's data. The size columns of the row (`parameter_counts`, `base_weight_bytes`) live here too: they are
facts about what was assembled, not about training.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from harness import adapters, models, tasks
from harness.adapters.base import is_under, weight_bytes

log = logging.getLogger(__name__)


@dataclass
class Assembled:
    """A model ready to train: the task, the variant (its config only), the model with the variant injected and
    only what the variant trains left trainable, the tokenizer (None when not asked for), the task head's module
    names, the modules the variant adapted, and the variant's facts (the row's extra_json)."""

    task: tasks.Task
    variant: adapters.Variant
    model: torch.nn.Module
    tokenizer: Any | None
    head: list[str]
    targeted: list[str]
    facts: dict[str, Any]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (every device's: `torch.manual_seed` seeds CUDA, XPU and MPS
    too), as `transformers.set_seed` does. Not that function itself: its module (`transformers.trainer_utils`)
    imports peft and the Trainer's utilities, which a run of our layers needs nowhere else (0.1 s of its start).
    tests/test_speed.py checks that both leave every generator in the same state."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def assemble(cfg: DictConfig, device: torch.device | None = None, with_tokenizer: bool = True) -> Assembled:
    """Build `cfg`'s task, model and variant. The variant is built (and its config checked) before anything loads;
    the global seed is set just before the model is built, so the head's and the adapters' inits follow `cfg.seed`.
    `device` is where the model will train (QLoRA's compute dtype depends on it); the model stays on the CPU, for
    the caller to count (`parameter_counts`) and then move: bitsandbytes quantizes on the move to CUDA."""
    variant = adapters.build(cfg.variant)
    task = tasks.get(cfg.task, cfg.data)
    seed_everything(cfg.seed)  # before any module is built: head and adapter inits are seeded
    loaded = models.load(cfg.model, task.head_kind, task.num_labels, cfg.data.cache_dir, with_tokenizer=with_tokenizer)
    prepared = variant.prepare(loaded.model, loaded.head, device)
    return Assembled(task=task, variant=variant, model=loaded.model, tokenizer=loaded.tokenizer, head=loaded.head,
                     targeted=prepared.targeted, facts=prepared.facts)


@dataclass
class Splits:
    """A run's tokenized data: what it trains on, what it is scored on ({split: dataset}), and with
    train.selection=heldout the slice of the training data that picks the checkpoint (else None)."""

    train: Any
    evals: dict[str, Any]
    selection: Any | None = None


def read_splits(cfg: DictConfig, setup: Assembled) -> Splits:
    """The task's splits under `cfg` (protocol, caps, token cache), with the selection slice taken out of train
    when train.selection=heldout."""
    train, evals = setup.task.datasets(setup.tokenizer, cfg.seed)
    if cfg.train.get("selection", "eval_best") != "heldout":
        return Splits(train, evals)
    train, selection = setup.task.selection_split(train)  # a slice of train picks the checkpoint
    log.info("train.selection=heldout: %d training rows pick the checkpoint, %d train", len(selection), len(train))
    return Splits(train, evals, selection)


def parameter_counts(model: torch.nn.Module, head: list[str]) -> dict[str, int]:
    """Trainable parameters with and without the task head (papers count without), the head, the total."""
    trainable = head_params = trainable_head = total = 0
    for name, param in model.named_parameters():
        n = param.numel()
        in_head = is_under(name, head)
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
            total += nbytes() if callable(nbytes) else weight_bytes(weight)
    return total
