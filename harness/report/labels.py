"""How tasks, metrics and variants are named and ordered in the report's tables and plots."""

from __future__ import annotations

# ---- how tasks, metrics and variants are shown ------------------------------------------------------
TASK_ORDER = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb", "wnli", "squad", "squad_v2")
TASK_LABELS = {"mnli": "MNLI", "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI", "qqp": "QQP",
               "rte": "RTE", "stsb": "STS-B", "wnli": "WNLI", "squad": "SQuAD", "squad_v2": "SQuAD v2"}
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
VARIANT_LABELS = {"full": "Full FT", "head": "Head only", "bitfit": "BitFit", "lora": "LoRA", "rslora": "rsLoRA",
                  "dora": "DoRA", "lora_fa": "LoRA-FA", "lorafa": "LoRA-FA", "loraplus": "LoRA+",
                  "lora_plus": "LoRA+", "vera": "VeRA", "delta_lora": "Delta-LoRA", "deltalora": "Delta-LoRA",
                  "dylora": "DyLoRA", "adalora": "AdaLoRA", "qlora": "QLoRA"}


def variant_label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def column_label(task: str, metric: str, primary: bool) -> str:
    if (task, metric) in COLUMN_LABELS:
        return COLUMN_LABELS[(task, metric)]
    name = TASK_LABELS.get(task, task)
    return name if primary else f"{name} {METRIC_LABELS.get(metric, metric)}"

def task_position(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)
