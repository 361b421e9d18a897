"""Saving what a run trained (adapter + task head) with safetensors, and loading it into a fresh base model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from harness.errors import HarnessError


def adapter_state(model: nn.Module, variant) -> dict[str, torch.Tensor]:
    """Every trainable tensor (adapter and head) plus what the variant needs besides (its `extra_state`)."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    state.update(variant.extra_state(model))
    return {name: t.contiguous().cpu().clone() for name, t in state.items()}


def save_adapter(model: nn.Module, variant, path: Path, state: dict[str, torch.Tensor] | None = None) -> int:
    """Write the adapter file (the model's current `adapter_state`, or `state` taken earlier); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(adapter_state(model, variant) if state is None else state, str(tmp), metadata={"variant": variant.name})
    tmp.replace(path)
    return path.stat().st_size


def load_adapter(model: nn.Module, path: Path) -> None:
    """Load a saved adapter into `model` (already built and injected with the same variant config)."""
    state = load_file(str(path))
    missing_from_model = set(state) - set(model.state_dict())
    if missing_from_model:
        raise HarnessError(f"{path}: tensors {sorted(missing_from_model)[:5]} have no place in this model; "
                           "build it with the same model, task and variant config that trained the adapter")
    model.load_state_dict(state, strict=False)
