"""DyLoRA (Valipour et al., 2023): one LoRA adapter trained for every rank up to r at once.

Each training step samples b uniformly from 1..r and uses only the first b components, with the scaling
alpha / b:  W x + (alpha / b) B[:, :b] A[:b] x. Components are thereby ordered by importance, and after
training the adapter can be truncated to any rank b <= r without retraining. Evaluation scores the one
trained adapter at full rank and at each rank of `eval_ranks`, giving a rank curve from a single run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from harness.adapters.base import adapter_layers, register
from harness.adapters.lora import LoRA, LoRALinear
from harness.errors import require


class DyLoRALinear(LoRALinear):
    """LoRA's layer using its first `active_rank` components with scaling alpha / active_rank."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base, r, alpha / r, dropout)
        self.alpha = alpha
        self.active_rank = r

    def set_rank(self, b: int) -> None:
        if not 1 <= b <= self.r:
            raise ValueError(f"DyLoRA rank {b} outside 1..{self.r}")
        self.active_rank = b
        self.scaling = self.alpha / b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.active_rank
        return self.lora_A[:b], self.lora_B[:, :b], self.scaling  # views: the rank is a slice, not a copy

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}"


@register("dylora")
class DyLoRA(LoRA):
    """DyLoRA; keys r (the largest rank), alpha, eval_ranks (null: 1, 2, 4, ... below r, then r)."""

    peft_supported = False

    def validate(self) -> None:
        super().validate()
        ranks = self.option("eval_ranks")
        r = self.option("r")
        if ranks is not None:
            ranks = list(ranks)
            require(bool(ranks) and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= r for b in ranks),
                    "variant.eval_ranks", ranks, f"null or a non-empty list of ranks between 1 and variant.r={r}")

    def eval_ranks(self) -> list[int]:
        ranks = self.option("eval_ranks")
        if ranks is not None:
            return list(ranks)
        r = self.option("r")
        return [2**k for k in range(r.bit_length()) if 2**k < r] + [r]

    def make_layer(self, name: str, base: nn.Linear) -> DyLoRALinear:
        return DyLoRALinear(base, self.option("r"), self.option("alpha"), self.option("dropout", 0.0))

    @staticmethod
    def set_rank(model: nn.Module, b: int) -> None:
        for _, layer in adapter_layers(model):
            layer.set_rank(b)

    def before_step(self, model: nn.Module, step: int, generator: torch.Generator) -> None:
        """Draw this step's rank b uniformly from 1..r (one b for all layers, as in the paper)."""
        b = int(torch.randint(1, self.option("r") + 1, (1,), generator=generator))
        self.set_rank(model, b)

    @contextlib.contextmanager
    def at_rank(self, model: nn.Module, b: int) -> Iterator[None]:
        """Evaluate at rank b; the model goes back to full rank afterwards (its resting state, saved and merged)."""
        self.set_rank(model, b)
        try:
            yield
        finally:
            self.set_rank(model, self.option("r"))

    def eval_settings(self, model: nn.Module):
        yield None, self.at_rank(model, self.option("r"))
        for b in self.eval_ranks():
            yield f"r={b}", self.at_rank(model, b)
