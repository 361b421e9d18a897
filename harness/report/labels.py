"""How tasks, metrics and variants are named and ordered in the report's tables and plots.

Variants and tasks are named by the `label:` of their YAML (conf/variant/<name>.yaml, conf/task/<name>.yaml),
so a new variant brings its display name with it; a YAML without one is shown by its name.
"""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# ---- how tasks, metrics and variants are shown ------------------------------------------------------
TASK_ORDER = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb", "wnli", "squad", "squad_v2")
METRIC_LABELS = {"accuracy": "accuracy", "accuracy_mm": "accuracy (mismatched)", "f1": "F1", "mcc": "MCC",
                 "pearson": "Pearson", "spearman": "Spearman", "exact": "EM"}
# Shown beside the task's primary metric in the main table (the LoRA paper reports MNLI matched only;
# we show both halves) ...
COMPANIONS = {"mnli": ("accuracy_mm",), "squad": ("exact",), "squad_v2": ("exact",)}
# ... and available with extra_metrics=True (always in the CSV).
EXTRAS = {"mrpc": ("f1",), "qqp": ("f1",), "stsb": ("spearman",), "cola": ("accuracy",)}
COLUMN_LABELS = {("mnli", "accuracy"): "MNLI-m", ("mnli", "accuracy_mm"): "MNLI-mm",
                 ("squad", "f1"): "SQuAD F1", ("squad", "exact"): "SQuAD EM",
                 ("squad_v2", "f1"): "SQuAD v2 F1", ("squad_v2", "exact"): "SQuAD v2 EM"}
VARIANT_ORDER = ("full", "head", "bitfit")  # baselines first, as the LoRA paper lists them


@functools.lru_cache(maxsize=None)
def config_labels(group: str, conf_dir: str | Path = CONF_DIR) -> dict[str, str]:
    """{name: label} from every conf/<group>/*.yaml that has a `label:` (display only: not in the run_key)."""
    labels = {}
    for path in sorted(Path(conf_dir, group).glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if cfg.get("label"):
            labels[str(cfg.get("name", path.stem))] = str(cfg.label)
    return labels


def variant_label(variant: str) -> str:
    return config_labels("variant").get(variant, variant)


def task_label(task: str) -> str:
    return config_labels("task").get(task, task)


def column_label(task: str, metric: str, primary: bool) -> str:
    if (task, metric) in COLUMN_LABELS:
        return COLUMN_LABELS[(task, metric)]
    name = task_label(task)
    return name if primary else f"{name} {METRIC_LABELS.get(metric, metric)}"


def task_position(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)
