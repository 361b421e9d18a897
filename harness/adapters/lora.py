"""LoRA (Hu et al., 2021): W x + (alpha / r) * B A x with A (r x in) and B (out x r) trained, W frozen.

`LoRA` is also the parent of the LoRA family (rsLoRA, DoRA, LoRA-FA, LoRA+, VeRA, Delta-LoRA, DyLoRA, QLoRA):
it owns what they share — the layer, injection by name, and the peft side (`variant.impl=peft` injects peft's
layers instead of ours; `save_other_formats` writes any of them in peft's own format).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters import peft_bridge
from harness.adapters.base import AdapterLinear, kaiming_uniform_like_linear, register
from harness.adapters.inject import AdapterVariant, select_targets
from harness.errors import ConfigError

PEFT_FOLDER = "peft_adapter"  # beside the run's adapter.safetensors


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T computed as x (W + s B A)^T + b, with its backward written out.

    Training through the merged weight W + sBA trades GEMMs over the activations for work on the weight. Of the
    adapter's rank-r GEMMs over the (tokens x features) activations it removes one of the two in forward (u B^T;
    u = s x A^T stays, its gradients need it) and one of the four in backward (dL/dx through B then A; dL/dA and
    dL/dB stay), at the price of rebuilding W + sBA in each direction: 2 x out x in x r multiply-adds per step
    whatever the batch. It pays only for batches of many tokens, so `LoRALinear` takes this path from its
    `merged_path_min_tokens` on (4,096 for MiniLM's layers; measured: benchmarks/adapter_step.py --crossover).
    Same math as the composed ops, different float rounding order.

    Keeps what autograd would keep: x (only when A is trained: LoRA-FA keeps nothing of it) and the rank-r u;
    the frozen W, A and B are parameters, not activations. Under autocast the GEMMs run in the autocast dtype
    in both directions, as the composed ops would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        tokens = x.reshape(-1, x.shape[-1])
        out = F.linear(tokens, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)
        u = F.linear(tokens, lora_A) * scaling
        ctx.save_for_backward(tokens if lora_A.requires_grad else None, u, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        tokens, u, weight, lora_A, lora_B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:  # dL/dx = g (W + s B A)
            merged = torch.addmm(weight, lora_B, lora_A, alpha=ctx.scaling).to(g.dtype)
            grad_x = (g @ merged).view(*grad_out.shape[:-1], -1)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_A = ((g @ lora_B.to(g.dtype)) * ctx.scaling).t() @ tokens.to(g.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = g.t() @ u.to(g.dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None


class LoRALinear(AdapterLinear):
    """The loralib/peft layer: A kaiming-uniform, B zeros, so the model is unchanged at initialisation."""

    prefix = "lora_"
    # Training through the merged weight (`LoRALinearFunction`) pays from merged_path_min_tokens tokens per batch
    # (batch x padded length): rebuilding W + sBA costs out x in x r per direction, whatever the batch, while the
    # rank-r GEMMs it saves cost tokens x r x (in + out)-ish, so the crossover grows as in x out / (in + out).
    # This factor on that width is measured: benchmarks/adapter_step.py --crossover put MiniLM's 384 x 384 layers
    # (width 192) at 4,096 tokens (merged/composed 1.12 at 2,048, 0.99 at 4,096): 4096 / 192. roberta-base's
    # 768 x 768 (width 384) then crosses at 8,192 (scaled, not measured).
    MERGED_PATH_TOKENS_PER_WIDTH = 4096 / 192

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base)
        self.r = r
        self.scaling = scaling
        width = base.in_features * base.out_features / (base.in_features + base.out_features)
        self.merged_path_min_tokens = round(self.MERGED_PATH_TOKENS_PER_WIDTH * width)
        # Adapter weights stay fp32 whatever the base holds (bf16, NF4): QLoRA's "adapter in full precision".
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        kaiming_uniform_like_linear(self.lora_A)  # same init as peft's `init_lora_weights=True`
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) in use; DyLoRA narrows them to its current rank."""
        return self.lora_A, self.lora_B, self.scaling

    def scaled_down_projection(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * A dropout(x): the rank-r intermediate, where the scaling costs r/out of scaling the output."""
        lora_A, _, scaling = self.factors()
        return F.linear(self.lora_dropout(x).to(lora_A.dtype), lora_A) * scaling

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        _, lora_B, _ = self.factors()
        return F.linear(self.scaled_down_projection(x), lora_B).to(base_out.dtype)

    def fused(self) -> bool:
        """Whether forward can run as `LoRALinearFunction`: a plain nn.Linear base (not quantized) with a frozen
        weight in the adapter's dtype, and no dropout at work (the base and the adapter then read the same x)."""
        base = self.base
        return (type(base) is nn.Linear and not base.weight.requires_grad and base.weight.dtype == self.lora_A.dtype
                and (isinstance(self.lora_dropout, nn.Identity) or not self.training))

    def merged_path_pays(self, x: torch.Tensor) -> bool:
        """Whether this batch has enough tokens for the merged-weight path to be the faster one."""
        return x.numel() // x.shape[-1] >= self.merged_path_min_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.fused() and self.merged_path_pays(x):
            lora_A, lora_B, scaling = self.factors()
            return LoRALinearFunction.apply(x, self.base.weight, self.base.bias, lora_A, lora_B, scaling)
        tokens = x.reshape(-1, x.shape[-1])
        out = self.base(tokens)  # a fresh (tokens x out) tensor, saved by nothing: safe to accumulate into
        u = self.scaled_down_projection(tokens)
        _, lora_B, _ = self.factors()
        if u.dtype != out.dtype:  # e.g. a bf16 base without autocast: add in the base's precision
            out = out + F.linear(u, lora_B).to(out.dtype)
        else:  # out += u B^T inside the GEMM (beta=1): no add pass, no second (tokens x out) tensor
            out.addmm_(u, lora_B.to(u.dtype).t())
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        lora_A, lora_B, scaling = self.factors()
        return (lora_B @ lora_A) * scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


@register("lora")
class LoRA(AdapterVariant):
    """LoRA with scaling alpha / r.

    With `impl=peft` the same targets get peft's layers (`peft_config_fields()` says which), and the trainable
    parameters are decided by the same `trainable` rule for both implementations, so counts and rows agree.
    """

    layer_prefix = "lora_"
    peft_supported = True

    def scaling(self) -> float:
        return self.option("alpha") / self.option("r")

    def make_layer(self, name: str, base: nn.Linear) -> AdapterLinear:
        return LoRALinear(base, self.option("r"), self.scaling(), self.option("dropout", 0.0))

    # ---- both implementations ----------------------------------------------------------------------
    @property
    def impl(self) -> str:
        return self.option("impl", "ours")

    def inject(self, model: nn.Module, head: list[str]) -> list[str]:
        self.check_rank(select_targets(model, list(self.option("targets") or []), self.option("all_linear", False),
                                       head))
        if self.impl == "peft":
            targeted = peft_bridge.inject(model, self, head)
        else:
            targeted = super().inject(model, head)
        # New adapter tensors start out trainable (and peft marks its own); freeze them all so that `trainable`
        # alone decides, the same rule for both implementations (LoRA-FA: B only).
        model.requires_grad_(False)
        return targeted

    def max_rank(self, layer: nn.Linear) -> int:
        """The largest useful r for `layer`: B A has rank at most min(in, out), so a larger r only adds parameters."""
        return min(layer.in_features, layer.out_features)

    def check_rank(self, chosen: list[tuple[str, nn.Linear]]) -> None:
        """Reject an r above `max_rank` of a targeted layer before any adapter tensor is allocated."""
        r = self.option("r")
        for name, layer in chosen:
            if r > self.max_rank(layer):
                raise ConfigError(f"variant.r={r} is too large for {name} ({layer.in_features} in x "
                                  f"{layer.out_features} out): {self.name} allows r <= {self.max_rank(layer)} there; "
                                  "lower variant.r")

    def adapter_attribute(self, name: str) -> str | None:
        """The adapter tensor a parameter name refers to (`lora_A`, `vera_lambda_d`), for our names
        (`...query.lora_A`) and peft's (`...query.lora_A.default.weight`) alike; None for other parameters."""
        return next((part for part in name.split(".") if part.startswith(self.layer_prefix)), None)

    def is_adapter_param(self, name: str) -> bool:
        return self.adapter_attribute(name) is not None

    # ---- peft ---------------------------------------------------------------------------------------
    def peft_config_fields(self, targets: list[str]) -> dict:
        """The fields of the peft config that builds this variant's layers on exactly `targets` (full module names),
        its `peft_type` included: peft fills in the others with its defaults."""
        return {"peft_type": "LORA", "r": self.option("r"), "lora_alpha": self.option("alpha"),
                "lora_dropout": self.option("dropout", 0.0), "target_modules": list(targets), "bias": "none",
                **self.peft_lora_options()}

    def peft_lora_options(self) -> dict:
        """Extra `LoraConfig` switches of a subclass (rsLoRA: use_rslora, DoRA: use_dora)."""
        return {}

    def peft_shared_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors peft saves once for the whole model, by their key in peft's file (VeRA's projections)."""
        return {}

    def save_other_formats(self, model: nn.Module, folder, head: list[str], targeted: list[str]) -> None:
        """The adapter and head in peft's format too, in `<folder>/peft_adapter`:
        `PeftModel.from_pretrained(base_model, <folder>/peft_adapter)` loads them."""
        if self.peft_supported:
            peft_bridge.save(model, self, Path(folder) / PEFT_FOLDER, head, targeted)
