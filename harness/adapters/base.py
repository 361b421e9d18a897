"""The shared adapter module: the layer every adapter wraps a frozen linear with, and the variant registry.

Two levels, as in peft's tuners:

* `AdapterLinear` is one adapted layer: `forward(x) = base(x) + delta(x, base(x))` around a frozen
  `nn.Linear`. A variant's layer supplies `delta` and `delta_weight`; merge/unmerge come from here.
* `Variant` is one fine-tuning method as a whole: it validates its config, decides what is trainable,
  injects its layers, and hands the trainer its hooks (optimizer parameter groups, a hook before each
  step, a hook after each optimizer step, the settings evaluation should score). Methods that are not
  adapters (full fine-tuning, head only, BitFit) are variants too: freezing policies with no layers.

A variant object holds its config and nothing else, so one object can prepare any number of models. What
`prepare` did comes back as `Prepared`; state that lives for one training run (DyLoRA's rank generator,
Delta-LoRA's previous factors) is made by `start_training` and handed to the step hooks by the loop.

Every variant registers itself by name with `@register`; `conf/variant/<name>.yaml` carries its defaults.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from harness.errors import ConfigError, require

VARIANTS: dict[str, type[Variant]] = {}


def register(name: str):
    """Class decorator adding a variant to the registry; a second variant with the same name is a bug."""

    def add(cls: type[Variant]) -> type[Variant]:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} is already registered by {VARIANTS[name].__module__}")
        cls.name = name
        VARIANTS[name] = cls
        return cls

    return add


def build(cfg) -> Variant:
    """The registered variant named by `cfg.name`, validated against `cfg`."""
    name = cfg.get("name")
    if name not in VARIANTS:
        raise ConfigError(f"variant={name!r} is unknown; registered variants: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name](cfg)


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` plus a variant's update: `base(x) + delta(x, base(x))`.

    Subclasses name their parameters with their `prefix` (`lora_A`, `vera_lambda_d`) so that counting,
    saving and weight-decay rules can find them by name.
    """

    prefix: ClassVar[str] = "adapter_"

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"{type(self).__name__} can only wrap nn.Linear, got {type(base).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, so code reading `layer.weight` (e.g. dtype checks in transformers) works."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The update added to the frozen layer's output (DoRA needs `base_out`; LoRA ignores it)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The same update as a dense (out, in) matrix: merged weight = base weight + delta_weight()."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        if self.merged:
            return base_out
        return base_out + self.delta(x, base_out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: inference then costs what the plain model costs."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to float rounding) so training can continue."""
        if self.merged:
            self.merged = False
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(qualified name, layer) for every adapted layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def is_under(name: str, prefixes: list[str]) -> bool:
    """Whether parameter/module `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_norm_or_bias(name: str, param: nn.Parameter) -> bool:
    """Biases, LayerNorm weights and other vectors: trained without weight decay (BERT/RoBERTa practice)."""
    return param.ndim < 2 or name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name


@dataclass(frozen=True)
class Prepared:
    """What `Variant.prepare` did to a model: the modules it adapted (full names) and the variant's own
    measurements for the row's extra_json (QLoRA's base bytes before and after quantization, VeRA's shared bytes)."""

    targeted: list[str]
    facts: dict[str, Any] = field(default_factory=dict)


class Variant:
    """One fine-tuning method. Subclasses override `inject` (adapters) or `trainable` (freezing policies).

    Config keys every variant understands (see conf/variant/*.yaml):
      train_biases / train_layer_norms: also train the encoder's biases / LayerNorm parameters, as the
      article 'Implementing LoRA From Scratch' does; the task head is always trainable.
    """

    name: ClassVar[str]
    uses_rank: ClassVar[bool] = False  # rank-free variants run once per task x seed in sweeps
    peft_supported: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.validate()

    # ---- config -------------------------------------------------------------------------------------
    def option(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    def validate(self) -> None:
        for key in ("train_biases", "train_layer_norms"):
            value = self.option(key, False)
            require(isinstance(value, bool), f"variant.{key}", value, "true or false")
        impl = self.option("impl", "ours")
        require(impl in ("ours", "peft"), "variant.impl", impl, "'ours' or 'peft'")
        if impl == "peft" and not self.peft_supported:
            raise ConfigError(
                f"variant.impl=peft: peft has no implementation of variant={self.name!r}; use variant.impl=ours"
            )

    @property
    def rank(self) -> int | None:
        return self.option("r") if self.uses_rank else None

    # ---- building -----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, head: list[str], device: torch.device | None = None) -> Prepared:
        """Freeze the model, inject this variant, unfreeze what it trains (the task head always). `device` is
        where the model will train (QLoRA picks its compute dtype for it; None: CUDA if present, else CPU)."""
        model.requires_grad_(False)
        targeted = self.inject(model, head)
        for name, param in model.named_parameters():
            if is_under(name, head) or self.trainable(name, param):
                param.requires_grad_(True)
        return Prepared(targeted, self.facts(model))

    def inject(self, model: nn.Module, head: list[str]) -> list[str]:
        """Replace target modules with adapter layers and return their names; freezing policies inject nothing."""
        return []

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Whether a parameter outside the head is trained (adapter parameters are trainable by default)."""
        if self.option("train_biases", False) and name.endswith(".bias"):
            return True
        if self.option("train_layer_norms", False) and ("LayerNorm" in name or "layer_norm" in name):
            return True
        return self.is_adapter_param(name)

    def is_adapter_param(self, name: str) -> bool:
        return False

    # ---- trainer hooks ------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: weight decay on matrices only (LoRA+ overrides to give B its own lr)."""
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if is_norm_or_bias(name, param) else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"}]
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "no_decay"})
        return [g for g in groups if g["params"]]

    def check_schedule(self, total_steps: int) -> None:
        """Called once the run's number of optimizer steps is known, before the first: a variant whose settings
        cannot act within that many steps raises ConfigError (Delta-LoRA's start step)."""

    def start_training(self, model: nn.Module, seed: int) -> dict[str, Any]:
        """The state one training run keeps for this variant (DyLoRA: its rank generator), made before the first
        step and passed to `before_step` and `after_step`; the variant object itself stays as configured."""
        return {}

    def before_step(self, model: nn.Module, step: int, state: dict[str, Any]) -> None:
        """Called before each optimizer step's first forward (DyLoRA samples its rank here)."""

    def after_step(self, model: nn.Module, step: int, state: dict[str, Any]) -> None:
        """Called after each optimizer step (Delta-LoRA updates the frozen weights here)."""

    def eval_settings(self, model: nn.Module) -> Iterator[tuple[str | None, contextlib.AbstractContextManager]]:
        """Settings evaluation scores, as (label, context). One unlabelled setting; DyLoRA yields one per rank."""
        yield None, contextlib.nullcontext()

    def row_columns(self, extra_scores: dict[str, float]) -> dict[str, Any]:
        """Row columns of this variant from `extra_scores`, the primary score of each labelled `eval_settings`
        setting at the last evaluation (DyLoRA: its score per rank)."""
        return {}

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors besides the trainable ones that a saved adapter needs (Delta-LoRA: its updated base weights)."""
        return {}

    def facts(self, model: nn.Module) -> dict[str, Any]:
        """Variant-specific measurements of a prepared model, for `Prepared.facts` and the row's extra_json (VeRA:
        its shared projections' bytes; QLoRA adds what quantizing measured in its `prepare`)."""
        return {}

    def save_other_formats(self, model: nn.Module, folder, head: list[str], targeted: list[str]) -> None:
        """Save the adapter in other tools' formats too (peft's, for variants peft has)."""


def weight_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight occupies. A quantized tensor subclass (torchao NF4, int8) counts its parts (codes and
    scales), not numel x its logical dtype's size."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(weight_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def kaiming_uniform_like_linear(weight: torch.Tensor) -> None:
    """nn.Linear's default init (kaiming-uniform with a=sqrt(5)), which LoRA and peft use for A."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
