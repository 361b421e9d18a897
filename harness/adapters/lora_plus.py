"""LoRA+ (Hayou et al., 2024): LoRA with B trained at a larger learning rate than A, lr_B = ratio * lr_A.

Same layer as LoRA; only the optimizer's parameter groups differ. The paper's analysis (feature learning
at large width) gives B a learning rate a fixed ratio above A's; its recommended default is ratio = 2^4.
"""

from __future__ import annotations

from torch import nn

from harness.adapters import peft_bridge
from harness.adapters.base import register
from harness.adapters.lora import LoRA
from harness.errors import require


@register("lora_plus")
class LoRAPlus(LoRA):
    """LoRA whose lora_B parameters get their own AdamW group at `lr_ratio` x the learning rate.

    With `impl=peft` the groups come from peft's `create_loraplus_optimizer` (which also puts 1-D tensors
    such as the head's biases at the higher rate, as the LoRA+ authors' code does).
    """

    def validate(self) -> None:
        super().validate()
        ratio = self.option("lr_ratio")
        require(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio >= 1,
                "variant.lr_ratio", ratio, "a number >= 1 (B's learning rate / A's; the paper's default is 16)")

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        ratio = self.option("lr_ratio")
        if self.impl == "peft":
            return peft_bridge.loraplus_param_groups(model, lr, ratio, weight_decay)
        lora_B = [p for name, p in model.named_parameters()
                  if p.requires_grad and self.adapter_attribute(name) == "lora_B"]
        in_B = {id(p) for p in lora_B}
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in in_B]}
                  for group in super().param_groups(model, lr, weight_decay)]
        groups.append({"params": lora_B, "weight_decay": weight_decay, "lr": lr * ratio, "name": "lora_B"})
        return [group for group in groups if group["params"]]
