"""Adapters and fine-tuning variants. Every module in this package registers its variants on import,
so a new variant is one new file here plus one conf/variant/<name>.yaml."""

import importlib
import pkgutil

from harness.adapters.base import VARIANTS, AdapterLinear, Prepared, Variant, adapter_layers, build, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "inject"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["VARIANTS", "AdapterLinear", "Prepared", "Variant", "adapter_layers", "build", "register"]
