"""Tasks: where the data comes from, how it is tokenized, batched and scored.

A task kind (glue, squad) is a class registered with `@register_kind`; each task is a YAML in conf/task/.
"""

from __future__ import annotations

import importlib
import pkgutil

from harness.errors import ConfigError
from harness.tasks.base import Task

KINDS: dict[str, type[Task]] = {}


def register_kind(kind: str):
    def add(cls: type[Task]) -> type[Task]:
        if kind in KINDS:
            raise ValueError(f"task kind {kind!r} is already registered by {KINDS[kind].__module__}")
        KINDS[kind] = cls
        return cls

    return add


def get(task_cfg, data_cfg) -> Task:
    kind = task_cfg.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"task.kind={kind!r} is unknown; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[kind](task_cfg, data_cfg)


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
