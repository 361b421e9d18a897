"""Delta-LoRA (Zi et al., 2023): LoRA that also moves the frozen weight, by the change of the LoRA product.

After every optimizer step t past the start step K:  W <- W + lambda * (alpha / r) * (B_{t+1} A_{t+1} - B_t A_t).
W never receives a gradient and has no optimizer state, so memory stays LoRA's; the update is a rank-2r
correction computed from A and B alone. The paper removes dropout from the adapter branch (so that the
gradient of A B stands in for the gradient W would have had); a dropout > 0 is rejected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.adapters.base import adapter_layers, register
from harness.adapters.lora import LoRA
from harness.errors import ConfigError, require


@register("delta_lora")
class DeltaLoRA(LoRA):
    """LoRA's layer + `after_step` updating each adapted layer's frozen weight; keys `update_ratio` (lambda) and
    `start_step` (K). The updated W is part of the saved adapter (`extra_state`): without it the adapter is
    meaningless."""

    peft_supported = False

    def validate(self) -> None:
        super().validate()
        if self.option("dropout", 0.0) != 0:
            raise ConfigError(f"variant=delta_lora with variant.dropout={self.option('dropout')!r}: Delta-LoRA has no "
                              "dropout on the adapter branch (the update of W relies on it); set variant.dropout=0")
        ratio = self.option("update_ratio")
        require(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0,
                "variant.update_ratio", ratio, "a positive number (lambda in W += lambda * (alpha/r) * delta(BA))")
        start = self.option("start_step")
        require(isinstance(start, int) and not isinstance(start, bool) and start >= 0, "variant.start_step", start,
                "a non-negative integer K: W is updated after optimizer steps t > K (counting from 0)")

    def check_schedule(self, total_steps: int) -> None:
        start = self.option("start_step")
        if start >= total_steps - 1:  # steps are t = 0 .. total_steps - 1; W moves after those with t > K
            raise ConfigError(f"variant=delta_lora with variant.start_step={start}, but this run has {total_steps} "
                              "optimizer steps: W would never be updated and the run would be plain LoRA; set "
                              f"variant.start_step below {total_steps - 1} (the paper's K=500 is for long runs)")

    @torch.no_grad()
    def before_step(self, model: nn.Module, step: int, state: dict[str, Any]) -> None:
        """Remember A_t and B_t (tiny copies, in the run's `state`) before the optimizer moves them."""
        state["previous"] = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                             for name, layer in adapter_layers(model)}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, state: dict[str, Any]) -> None:
        if step <= self.option("start_step"):
            return
        previous = state.get("previous")
        if previous is None:
            raise RuntimeError("DeltaLoRA.after_step needs before_step to have run for this step (the trainer calls both)")
        rate = self.option("update_ratio") * self.scaling()
        for name, layer in adapter_layers(model):
            old_A, old_B = previous[name]
            weight = layer.base.weight
            # W += rate * (B A - B_t A_t), as two rank-r GEMMs accumulated into W: no (out x in) temporary.
            weight.addmm_(layer.lora_B.to(weight.dtype), layer.lora_A.to(weight.dtype), alpha=rate)
            weight.addmm_(old_B.to(weight.dtype), old_A.to(weight.dtype), alpha=-rate)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.base.weight": layer.base.weight.detach() for name, layer in adapter_layers(model)}
