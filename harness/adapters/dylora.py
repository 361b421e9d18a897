"""DyLoRA (Valipour et al., 2023): one LoRA adapter trained for every rank up to r at once.

Each training step samples b uniformly from 1..r and uses only the first b components, with the scaling
alpha / b:  W x + (alpha / b) B[:, :b] A[:b] x. Components are thereby ordered by importance, and after
training the adapter can be truncated to any rank b <= r without retraining. Evaluation scores the one
trained adapter at full rank and at each rank of `eval_ranks`, giving a rank curve from a single run.

Two training modes (`variant.frozen`):
* frozen (default, the reference's): the step trains only the b-th component (row b of A, column b of B);
  components 1..b-1 are in the forward but detached. The authors' training script sets it on every step:
  `model.set_rank(new_rank, frozen=True)` in `callback_step.on_step_begin`
  (huawei-noah/Efficient-NLP DyLoRA/examples/NLU/examples/text-classification/run_glue.py), and
  `dynamic.forward` (DyLoRA/loralib/DyLoRA.py) then returns `cat([inputs[:, :rank].detach(), inputs[:, rank]])`.
* frozen=false: the step trains all b leading components (the harness's mode before the reference was checked).
The scaling is the same in both: the reference multiplies A and B each by sqrt(r / b), times alpha / r = alpha / b.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from harness.adapters.base import adapter_layers, register
from harness.adapters.lora import LoRA, LoRALinear
from harness.errors import require


class DyLoRALinear(LoRALinear):
    """LoRA's layer using its first `active_rank` components with scaling alpha / active_rank."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, frozen: bool = True):
        super().__init__(base, r, alpha / r, dropout)
        self.alpha = alpha
        self.active_rank = r
        self.frozen = frozen

    def set_rank(self, b: int) -> None:
        if not 1 <= b <= self.r:
            raise ValueError(f"DyLoRA rank {b} outside 1..{self.r}")
        self.active_rank = b
        self.scaling = self.alpha / b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.active_rank
        if self.frozen and self.training and torch.is_grad_enabled():
            # The reference's frozen mode: components 1..b-1 take part in the forward but get no gradient.
            lora_A = torch.cat([self.lora_A[:b - 1].detach(), self.lora_A[b - 1:b]])
            lora_B = torch.cat([self.lora_B[:, :b - 1].detach(), self.lora_B[:, b - 1:b]], dim=1)
            return lora_A, lora_B, self.scaling
        return self.lora_A[:b], self.lora_B[:, :b], self.scaling  # views: the rank is a slice, not a copy

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}, frozen={self.frozen}"


@register("dylora")
class DyLoRA(LoRA):
    """DyLoRA; keys r (the largest rank), alpha, eval_ranks (null: 1, 2, 4, ... below r, then r), frozen (train only
    the b-th component each step, as the reference does; false: all b leading ones)."""

    peft_supported = False

    def validate(self) -> None:
        super().validate()
        frozen = self.option("frozen", True)
        require(isinstance(frozen, bool), "variant.frozen", frozen,
                "true (the reference's mode: train only the sampled b-th component) or false (train components 1..b)")
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
        return DyLoRALinear(base, self.option("r"), self.option("alpha"), self.option("dropout", 0.0),
                            frozen=self.option("frozen", True))

    @staticmethod
    def set_rank(model: nn.Module, b: int) -> None:
        for _, layer in adapter_layers(model):
            layer.set_rank(b)

    def start_training(self, model: nn.Module, seed: int) -> dict[str, Any]:
        """The run's rank draws come from their own generator, seeded seed + 1: apart from dropout's (the global
        RNG), so that a run's ranks depend on its seed alone."""
        return {"rank_generator": torch.Generator().manual_seed(seed + 1)}

    def before_step(self, model: nn.Module, step: int, state: dict[str, Any]) -> None:
        """Draw this step's rank b uniformly from 1..r (one b for all layers, as in the paper)."""
        b = int(torch.randint(1, self.option("r") + 1, (1,), generator=state["rank_generator"]))
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

    def row_columns(self, extra_scores: dict[str, float]) -> dict[str, Any]:
        """rank_scores_json: {"r=<b>": primary score at rank b} of the last evaluation; null where a truncated
        rank's score is undefined (constant predictions: a NaN correlation), so an ok row holds no NaN."""
        finite = {label: score if math.isfinite(score) else None for label, score in extra_scores.items()}
        return {"rank_scores_json": json.dumps(finite)} if extra_scores else {}
