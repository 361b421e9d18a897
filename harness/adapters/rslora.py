"""rsLoRA (Kalajdzievski, 2023): LoRA with scaling alpha / sqrt(r) instead of alpha / r.

With alpha / r the update's magnitude collapses as the rank grows, so higher ranks learn no better;
alpha / sqrt(r) is the scaling that keeps it rank-stable. Everything else is LoRA.
"""

from __future__ import annotations

import math

from harness.adapters.base import register
from harness.adapters.lora import LoRA


@register("rslora")
class RsLoRA(LoRA):
    """LoRA scaled by alpha / sqrt(r); peft: `LoraConfig(use_rslora=True)`."""

    def scaling(self) -> float:
        return self.option("alpha") / math.sqrt(self.option("r"))

    def peft_lora_options(self) -> dict:
        return {"use_rslora": True}
