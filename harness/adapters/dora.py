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


class DoRALinearFunction(torch.autograd.Function):
    """y = g * (x W0^T + s (x A^T) B^T) + b, g = m / n with n the (constant) row norms, computed through the
    scaled merged weight: y = x (g * (W0 + s B A))^T + b, rebuilt in each direction (out x in x r work, whatever
    the batch). As for LoRA (`LoRALinearFunction`) this removes one of the two rank-r GEMMs over the activations
    in forward and one of four in backward, so `DoRALinear` takes it from `merged_path_min_tokens` on.

    m's gradient, sum over tokens of dy * z for the direction z = x (W0 + s B A)^T, is taken from the output,
    which backward keeps instead of z: z = (y - b) / g, so dL/dm = (sum_t dy * y - b * sum_t dy) / m. No
    (tokens x out) tensor besides the output is made or kept, which puts DoRA's cost next to LoRA's (peft keeps
    two more per layer). A row with g = 0 has lost its direction in y: there z is recomputed from x (rare).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, magnitude, norm):
        tokens = x.reshape(-1, x.shape[-1])
        g = (magnitude / norm).unsqueeze(1)
        out = F.linear(tokens, torch.addmm(weight, lora_B, lora_A, alpha=scaling) * g, bias)
        u = F.linear(tokens, lora_A) * scaling
        ctx.save_for_backward(tokens, u, weight, bias, lora_A, lora_B, magnitude, norm, out)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        tokens, u, weight, bias, lora_A, lora_B, magnitude, norm, out = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        dt = dy.dtype
        g = (magnitude / norm).unsqueeze(1)
        grad_x = grad_bias = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:  # dL/dx = dy (g * (W0 + s B A))
            merged = (torch.addmm(weight, lora_B, lora_A, alpha=ctx.scaling) * g).to(dt)
            grad_x = (dy @ merged).view(*grad_out.shape[:-1], -1)
        dy_sum = dy.sum(0) if bias is not None else None
        if ctx.needs_input_grad[2]:
            grad_bias = dy_sum
        if ctx.needs_input_grad[3]:
            grad_A = ((dy @ (lora_B * g).to(dt)) * ctx.scaling).t() @ tokens.to(dt)
        if ctx.needs_input_grad[4]:
            grad_B = (dy.t() @ u.to(dt)) * g
        if ctx.needs_input_grad[6]:
            if bool((g == 0).any()):  # y no longer holds z on some row: recompute z = x W0^T + u B^T
                z = F.linear(tokens.to(dt), weight.to(dt)).addmm_(u.to(dt), lora_B.to(dt).t())
                grad_m = torch.linalg.vecdot(dy, z, dim=0) / norm
            else:
                dy_y = torch.linalg.vecdot(dy, out.to(dt), dim=0)
                grad_m = (dy_y if bias is None else dy_y - bias * dy_sum) / magnitude
        return grad_x, None, grad_bias, grad_A, grad_B, None, grad_m, None


class DoRALinear(LoRALinear):
    """y = g * (W0 x + s B A x) + bias with g = m / ||W0 + s B A|| (detached).

    Without dropout on a plain base and with enough tokens in the batch this is `DoRALinearFunction` (backward
    keeps the output, where peft keeps two extra (tokens x out) tensors); otherwise the same formula from composed
    ops.
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
        if self.fused() and self.merged_path_pays(x):  # no dropout at work, a plain frozen base, many tokens
            return DoRALinearFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                            self.scaling, self.lora_magnitude_vector, self.weight_norm())
        g = self.magnitude_scale()
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            # With dropout the official DoRA code (and peft) feed the dropped input to W0 in the magnitude term:
            # base(x) + (g - 1) * W0 drop(x) + g * s B A drop(x). One extra GEMM, in training only.
            dropped = self.lora_dropout(x)
            lora = F.linear(F.linear(dropped, self.lora_A) * self.scaling, self.lora_B)
            return self.base(x) + (g - 1) * F.linear(dropped, self.base.weight) + g * lora
        direction = F.linear(x, self.base.weight) + F.linear(self.scaled_down_projection(x), self.lora_B)
        bias = self.base.bias
        return direction * g if bias is None else torch.addcmul(bias, direction, g)

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
