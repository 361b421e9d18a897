"""The peft side of the LoRA family: run a variant through peft's layers, and save any adapter in peft's format.

* `inject`: `variant.impl=peft` puts peft's layers on exactly the modules our injection would adapt (the
  same `select_targets`, passed to peft as full names), into the same transformers model, so the trainer,
  the meters and the results row are the same and one sweep compares the two implementations.
* `save`: writes `adapter_config.json` + `adapter_model.safetensors` as `PeftModel.save_pretrained` does,
  from our layers or from peft's, so `peft.PeftModel.from_pretrained(base_model, folder)` loads the
  trained adapter and task head (as `modules_to_save`) and predicts what the harness predicted.

peft is imported lazily, and `save` writes both files without it: a run of `variant.impl=ours` never imports peft
(0.1 s of its start, on top of what the run imports anyway). The config file holds the fields the variant sets
(`peft_config_fields`); peft fills in the rest with its defaults when it loads the file, and tests/test_variants.py
checks that what it loads equals the config peft itself builds.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from harness.adapters.base import is_under
from harness.adapters.inject import select_targets

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
# peft keeps lora_A / lora_B as nn.Linear modules, so their tensors are `<name>.weight` in its files; the
# DoRA magnitude and the VeRA vectors are saved under the bare name.
PEFT_FILE_SUFFIX = {"lora_A": ".weight", "lora_B": ".weight"}


def inject(model: nn.Module, variant, head: list[str]) -> list[str]:
    """peft's layers for `variant` on the modules our injection would choose; returns their names."""
    from peft import inject_adapter_in_model
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    chosen = select_targets(model, list(variant.option("targets") or []), variant.option("all_linear", False), head)
    targets = [name for name, _ in chosen]
    config = peft_config(variant, targets)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    if tuner.uses_shared_state:
        # VeRA keeps its shared projections on the tuner, which `inject_adapter_in_model` refuses; building the
        # tuner injects in place all the same (each layer holds a reference to the shared buffers).
        tuner(model, config, adapter_name=ADAPTER_NAME)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return targets


def peft_config(variant, targets: list[str]):
    """peft's config object (`LoraConfig`, `VeraConfig`) for `variant` on `targets`."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    fields = variant.peft_config_fields(targets)
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(fields.pop("peft_type"))]
    return config_class(**fields)


def peft_key(name: str, variant) -> str:
    """The key peft's files use for parameter `name` of our model or of a peft-injected one."""
    attribute = variant.adapter_attribute(name)
    if attribute is None:  # a task-head parameter, saved by peft as a `modules_to_save` entry
        return f"base_model.model.{name}"
    parts = name.split(".")
    path = ".".join(parts[: parts.index(attribute)])
    return f"base_model.model.{path}.{attribute}{PEFT_FILE_SUFFIX.get(attribute, '')}"


def peft_state(model: nn.Module, variant, head: list[str]) -> dict[str, torch.Tensor]:
    """Every adapter tensor (frozen ones too: LoRA-FA's A), the head, and the variant's shared tensors."""
    state = {}
    for name, param in model.named_parameters():
        if variant.adapter_attribute(name) is not None or is_under(name, head):
            state[peft_key(name, variant)] = param.detach()
    state.update(variant.peft_shared_tensors(model))
    return {key: tensor.contiguous().cpu().clone() for key, tensor in state.items()}


def save(model: nn.Module, variant, folder: str | Path, head: list[str], targeted: list[str]) -> None:
    """`adapter_config.json` and `adapter_model.safetensors` in `folder`, as `PeftModel.save_pretrained` writes them:
    the adapter on `targeted` (the modules `prepare` adapted), the task `head` as `modules_to_save`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**variant.peft_config_fields(targeted), "modules_to_save": list(head), "inference_mode": True}
    try:
        config["peft_version"] = importlib.metadata.version("peft")  # as peft records it: the one beside the run
    except importlib.metadata.PackageNotFoundError:
        pass
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(peft_state(model, variant, head), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """The parameter groups of peft's LoRA+ helper (`peft.optimizers.create_loraplus_optimizer`), for our trainer.

    As in the LoRA+ authors' code, peft gives B's learning rate (lr * ratio) to every 1-D trainable tensor
    too (biases, LayerNorm and head biases); ours gives it to B only.
    """
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=weight_decay)
    return [{"params": group["params"], "lr": group["lr"], "weight_decay": group["weight_decay"],
             "name": f"peft_loraplus_{i}"} for i, group in enumerate(optimizer.param_groups) if group["params"]]
