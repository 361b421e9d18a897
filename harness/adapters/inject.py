"""Injection by module name, shared by every adapter variant.

A target is matched against each module's qualified name as: the exact name, a dotted suffix (`query`
matches `roberta.encoder.layer.0.attention.self.query`), or, when written `re:<pattern>`, a regex that
must match the whole name. `all_linear` targets every `nn.Linear` of the encoder, never the task head.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from harness.adapters.base import AdapterLinear, Variant, is_under
from harness.errors import ConfigError, require


def matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def select_targets(model: nn.Module, targets: list[str], all_linear: bool, head: list[str]) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs to adapt, in model order; fails loudly, listing what exists, if none match."""
    chosen = []
    for name, module in model.named_modules():
        if not name or is_under(name, head) or isinstance(module, AdapterLinear):
            continue
        if all_linear:
            hit = isinstance(module, nn.Linear)
        else:
            hit = any(matches(name, t) for t in targets)
        if hit:
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"variant.targets={list(targets)} matched {name!r}, a {type(module).__name__}; "
                    "adapters wrap nn.Linear layers only: name linear layers (e.g. query, value, dense)"
                )
            chosen.append((name, module))
    if not chosen:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                               if isinstance(m, nn.Linear) and not is_under(n, head)})
        raise ConfigError(
            f"variant.targets={list(targets)} matched no module of {type(model).__name__}. "
            f"Linear layers it has (by last name component): {linear_names}. "
            "Use exact names, dotted suffixes, 're:<regex>', or variant.all_linear=true"
        )
    return chosen


def replace_modules(model: nn.Module, chosen: list[tuple[str, nn.Linear]],
                    make_layer: Callable[[str, nn.Linear], AdapterLinear]) -> list[str]:
    """Swap each chosen linear for `make_layer(name, linear)` with setattr on its parent."""
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_layer(name, module))
    return [name for name, _ in chosen]


class AdapterVariant(Variant):
    """A variant that wraps target linears in `AdapterLinear` layers (LoRA and its family).

    Config keys: r, alpha, dropout, targets, all_linear (+ the common ones of `Variant`).
    Subclasses implement `make_layer`, or `layer_maker` to see all targets first (VeRA sizes its shared
    matrices from them and hands them to every layer).
    """

    uses_rank = True
    layer_prefix: str = "lora_"

    def validate(self) -> None:
        super().validate()
        r = self.option("r")
        require(isinstance(r, int) and not isinstance(r, bool) and r > 0, "variant.r", r, "a positive integer rank")
        if "alpha" in self.cfg and self.option("alpha") is not None:
            alpha = self.option("alpha")
            require(isinstance(alpha, (int, float)) and alpha > 0, "variant.alpha", alpha, "a positive number")
        dropout = self.option("dropout", 0.0)
        require(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "variant.dropout", dropout, "0 <= dropout < 1")
        targets = self.option("targets") or []
        all_linear = self.option("all_linear", False)
        require(bool(targets) or all_linear, "variant.targets", targets,
                "a non-empty list of module names (e.g. [query, value]) or variant.all_linear=true")

    def inject(self, model: nn.Module, head: list[str]) -> list[str]:
        chosen = select_targets(model, list(self.option("targets") or []), self.option("all_linear", False), head)
        return replace_modules(model, chosen, self.layer_maker(chosen))

    def layer_maker(self, chosen: list[tuple[str, nn.Linear]]) -> Callable[[str, nn.Linear], AdapterLinear]:
        """What builds the layer of each target, given every target before any layer is built: `make_layer`, or
        (VeRA) a function holding what this model's layers share."""
        return self.make_layer

    def make_layer(self, name: str, base: nn.Linear) -> AdapterLinear:
        raise NotImplementedError

    def is_adapter_param(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1].startswith(self.layer_prefix)
