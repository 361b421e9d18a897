"""LoRA-FA (Zhang et al., 2023): LoRA with A frozen at its random initialisation; only B is trained.

Why it saves memory: A's gradient is the only thing in LoRA that needs the layer's full-width input x
(dL/dA = s B^T dL/dy x^T). With A frozen, backward needs only the rank-r product A x (for B's gradient),
so the (batch x tokens x d_in) input is no longer kept for backward — once per distinct input (query and
value share theirs), more where dropout gives each adapter its own copy.
"""

from __future__ import annotations

from harness.adapters.base import register
from harness.adapters.lora import LoRA
from harness.errors import ConfigError


@register("lora_fa")
class LoRAFA(LoRA):
    """LoRA's layer with A kept frozen (random kaiming init, never updated); peft: LoRA with lora_A frozen.

    A is not trainable, so it is saved with the adapter through `extra_state` (a reload must not depend on
    re-drawing the same random A).
    """

    def validate(self) -> None:
        super().validate()
        if self.option("lr_ratio") is not None:
            raise ConfigError(
                f"variant=lora_fa with variant.lr_ratio={self.option('lr_ratio')!r}: LoRA+'s ratio sets B's learning "
                "rate relative to A's, and LoRA-FA does not train A. Drop variant.lr_ratio and raise train.lr to "
                "give B a larger step, or use variant=lora_plus to train both A and B"
            )

    def is_adapter_param(self, name: str) -> bool:
        return self.adapter_attribute(name) == "lora_B"

    def extra_state(self, model):
        return {name: param.detach() for name, param in model.named_parameters()
                if self.adapter_attribute(name) == "lora_A"}
