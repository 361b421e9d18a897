"""DoRA (Liu et al., 2024): weight-decomposed LoRA, W' = m * (W0 + s B A) / ||W0 + s B A||, norm per output row.

The direction (W0 + s B A, normalised row by row) is learnt through LoRA's A and B; the magnitude m (one
number per output row) is trained directly. As the paper prescribes (section 4.3), the norm is treated as
a constant: computed without gradient, so backward neither stores nor differentiates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters.base import register
from harness.adapters.lora import LoRA, LoRALinear


class DoRALinear(LoRALinear):
    """y = g * (W0 x + s B A x) + bias with g = m / ||W0 + s B A|| (detached).

    Without dropout this is one GEMM for W0 x, one rank-r GEMM chain accumulated into it, and one fused
    multiply-add; backward keeps one (tokens x out) tensor for m's gradient, where peft keeps two.
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base, r, scaling, dropout)
        # m starts as the row norms of W0 (B = 0, so W0 + sBA = W0): g = 1 and the model is unchanged at init.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self.merge_norm: torch.Tensor | None = None  # the norm the merged weight was built with, for unmerge

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row, outside the autograd graph (a constant, DoRA section 4.3)."""
        weight = self.base.weight.to(self.lora_A.dtype)
        return torch.linalg.vector_norm(torch.addmm(weight, self.lora_B, self.lora_A, alpha=self.scaling), dim=1)

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ||W0 + s B A||: differentiable in m only."""
        return self.lora_magnitude_vector / self.weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        g = self.magnitude_scale()
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # With dropout the official DoRA code (and peft) feed the dropped input to W0 in the magnitude term:
            # base(x) + (g - 1) * W0 drop(x) + g * s B A drop(x). One extra GEMM, in training only.
            dropped = self.lora_dropout(x)
            lora = F.linear(F.linear(dropped, self.lora_A) * self.scaling, self.lora_B)
            return self.base(x) + (g - 1) * F.linear(dropped, self.base.weight) + g * lora
        tokens = x.reshape(-1, x.shape[-1])
        direction = F.linear(tokens, self.base.weight)  # W0 x; the bias is added after the scaling
        u = self.scaled_down_projection(tokens)
        direction.addmm_(u, self.lora_B.to(u.dtype).t())  # (W0 + sBA) x: the rank-r part inside the GEMM
        bias = self.base.bias
        out = direction * g if bias is None else torch.addcmul(bias, direction, g)
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """g * (W0 + s B A) - W0, so that merge() leaves g * (W0 + s B A) in the base weight."""
        g = self.magnitude_scale().unsqueeze(1)
        return (g - 1) * self.base.weight + g * (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.merge_norm = self.weight_norm()  # unmerging must divide by the norm of the unmerged weight
            super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            g = (self.lora_magnitude_vector / self.merge_norm).unsqueeze(1)
            lora_weight = (self.lora_B @ self.lora_A) * self.scaling
            self.base.weight.copy_((self.base.weight / g - lora_weight).to(self.base.weight.dtype))
            self.merged = False


@register("dora")
class DoRA(LoRA):
    """DoRA on LoRA's A and B plus a trainable magnitude per output row; peft: `LoraConfig(use_dora=True)`."""

    def make_layer(self, name: str, base: nn.Linear) -> DoRALinear:
        return DoRALinear(base, self.option("r"), self.scaling(), self.option("dropout", 0.0))

    def peft_lora_options(self) -> dict:
        return {"use_dora": True}
