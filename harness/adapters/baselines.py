"""Baselines that are freezing policies rather than adapters: full fine-tuning, head only, BitFit."""

from __future__ import annotations

from torch import nn

from harness.adapters.base import Variant, register


@register("full")
class FullFineTuning(Variant):
    """Every parameter trained (fairseq's RoBERTa GLUE recipe is the reference)."""

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        return True


@register("head")
class HeadOnly(Variant):
    """Only the task head trained: a linear probe (plus the head's own dense layer / BERT pooler)."""


@register("bitfit")
class BitFit(Variant):
    """BitFit (Ben Zaken et al., 2022): every bias term of the encoder trained, plus the head."""

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        return name.endswith(".bias") or super().trainable(name, param)
