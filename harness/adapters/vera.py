"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every adapted layer, and per layer
two trainable scaling vectors: W x + Lambda_b B Lambda_d A x.

A (r x in) and B (out x r) are drawn once from a seed, sized for the largest adapted layer and sliced per
layer, so the whole model holds them once; only b (out) and d (r) are trained per layer — on roberta-base
query,value with r=1024 that is 24 x (768 + 1024) = 43,008 parameters. There is no alpha: b and d are the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters.base import AdapterLinear, register
from harness.adapters.lora import LoRA
from harness.errors import ConfigError, require


def seeded_kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) from `generator`: the draws peft's VeRA makes from its
    `projection_prng_key`, so one seed gives the same matrices here, in peft, and in every run."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen pair every VeRA layer reads from. One module instance is a child of every layer, so the
    tensors exist once, `.to(device)` moves them once, and `model.buffers()` lists them once."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("vera_A", seeded_kaiming_uniform((r, max_in), generator))  # A first, then B: peft's order
        self.register_buffer("vera_B", seeded_kaiming_uniform((max_out, r), generator))

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}"


class VeRALinear(AdapterLinear):
    """base(x) + b * (B[:out] (d * (A[:, :in] dropout(x)))) with the shared A, B and this layer's b and d."""

    prefix = "vera_lambda_"

    def __init__(self, base: nn.Linear, projections: VeRAProjections, d_initial: float, dropout: float):
        super().__init__(base)
        self.vera_projections = projections
        self.r = projections.vera_A.shape[0]
        factory = {"device": base.weight.device, "dtype": torch.float32}
        # b = 0 makes the update zero at init (the model is unchanged); d starts at d_initial (0.1 in the paper),
        # non-zero so that b receives a gradient from the first step.
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features, **factory))
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(d_initial), **factory))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared matrices: A[:, :in] (r x in) and B[:out] (out x r), views, not copies."""
        shared = self.vera_projections
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features]

    def scaled_projection(self, x: torch.Tensor) -> torch.Tensor:
        """B (d * A x): the update before b scales each output."""
        vera_A, vera_B = self.projections()
        x = self.vera_dropout(x).to(vera_A.dtype)
        return F.linear(self.vera_lambda_d * F.linear(x, vera_A), vera_B)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return (self.vera_lambda_b * self.scaled_projection(x)).to(base_out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        if self.merged:
            return base_out
        h = self.scaled_projection(x)
        if h.dtype != base_out.dtype:
            return base_out + (self.vera_lambda_b * h).to(base_out.dtype)
        return base_out.addcmul_(h, self.vera_lambda_b)  # scale by b and add, in one pass, into the fresh base output

    def delta_weight(self) -> torch.Tensor:
        vera_A, vera_B = self.projections()
        return (self.vera_lambda_b.unsqueeze(1) * vera_B) @ (self.vera_lambda_d.unsqueeze(1) * vera_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


@register("vera")
class VeRA(LoRA):
    """VeRA; peft: `VeraConfig(projection_prng_key=seed, save_projection=True)`. Keys: r, seed, d_initial,
    dropout, targets (all adapted layers must be nn.Linear; their shapes may differ)."""

    layer_prefix = "vera_lambda_"

    def validate(self) -> None:
        super().validate()
        if self.option("alpha") is not None:
            raise ConfigError(f"variant=vera has no alpha (got variant.alpha={self.option('alpha')!r}): the trained "
                              "vectors b and d carry the scale. Remove variant.alpha")
        seed = self.option("seed")
        require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "variant.seed", seed,
                "a non-negative integer (the seed of the shared random matrices)")
        d_initial = self.option("d_initial")
        require(isinstance(d_initial, (int, float)) and not isinstance(d_initial, bool) and d_initial != 0,
                "variant.d_initial", d_initial, "a non-zero number (the paper's 0.1): with d = 0, b gets no gradient")

    def max_rank(self, layer: nn.Linear) -> int:
        """r is the size of the shared random matrices, and may exceed the layer's width (the paper's r=1024 on
        768-wide layers); above in x out the trained vector d has more entries than the weight it adapts."""
        return layer.in_features * layer.out_features

    def layer_maker(self, chosen: list[tuple[str, nn.Linear]]) -> Callable[[str, nn.Linear], VeRALinear]:
        """One pair of projections for this model, sized for its largest target, given to every layer."""
        max_in = max(module.in_features for _, module in chosen)
        max_out = max(module.out_features for _, module in chosen)
        device = chosen[0][1].weight.device
        projections = VeRAProjections(self.option("r"), max_in, max_out, self.option("seed")).to(device)
        return lambda name, base: VeRALinear(base, projections, self.option("d_initial"), self.option("dropout", 0.0))

    def make_layer(self, name: str, base: nn.Linear) -> VeRALinear:
        raise NotImplementedError("VeRA's layers share one pair of projections per model: build them with "
                                  "layer_maker(every target), not one at a time")

    @staticmethod
    def shared_buffers(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
        """{'vera_A': (state-dict name, tensor), 'vera_B': ...}: the shared pair, in our layers or in peft's."""
        found = {}
        for name, buffer in model.named_buffers():  # a shared tensor is listed once, under its first name
            kind = next((k for k in ("vera_A", "vera_B") if k in name.split(".")), None)
            if kind is not None and kind not in found:
                found[kind] = (name, buffer)
        return found

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # Saved once (loading writes them into the one shared tensor), so a reload never depends on
        # re-drawing them; peft's default (`save_projection=True`) does the same.
        return {name: tensor for name, tensor in self.shared_buffers(model).values()}

    def facts(self, model: nn.Module) -> dict:
        shared = [tensor for _, tensor in self.shared_buffers(model).values()]
        return {"vera_shared_projection_bytes": sum(t.numel() * t.element_size() for t in shared)}

    def peft_config_fields(self, targets: list[str]) -> dict:
        return {"peft_type": "VERA", "r": self.option("r"), "target_modules": list(targets),
                "projection_prng_key": self.option("seed"), "save_projection": True,
                "vera_dropout": self.option("dropout", 0.0), "d_initial": self.option("d_initial"), "bias": "none"}

    def peft_shared_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"base_model.{kind}": tensor for kind, (_, tensor) in self.shared_buffers(model).items()}
