"""LoRA (Hu et al., 2021): W x + (alpha / r) * B A x with A (r x in) and B (out x r) trained, W frozen."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters.base import AdapterLinear, kaiming_uniform_like_linear, register
from harness.adapters.inject import AdapterVariant


class LoRALinear(AdapterLinear):
    """The loralib/peft layer: A kaiming-uniform, B zeros, so the model is unchanged at initialisation."""

    prefix = "lora_"

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base)
        self.r = r
        self.scaling = scaling
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        kaiming_uniform_like_linear(self.lora_A)  # same init as peft's `init_lora_weights=True`
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Scaling applied to the rank-r intermediate: r/out of the work of scaling the output, nothing saved.
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


@register("lora")
class LoRA(AdapterVariant):
    """LoRA with scaling alpha / r."""

    layer_prefix = "lora_"
    peft_supported = True

    def scaling(self) -> float:
        return self.option("alpha") / self.option("r")

    def make_layer(self, name: str, base: nn.Linear) -> LoRALinear:
        return LoRALinear(base, self.option("r"), self.scaling(), self.option("dropout", 0.0))
