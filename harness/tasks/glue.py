"""The nine GLUE tasks: single sentences or pairs, classification (STS-B: regression), GLUE's metrics."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding

from harness.errors import DataError, require
from harness.metrics import glue_metrics
from harness.tasks import register_kind
from harness.tasks.base import Task, shared_value_groups


@register_kind("glue")
class GlueTask(Task):
    """Columns, labels and metrics come from conf/task/<name>.yaml; pairs are truncated longest-first."""

    def validate(self) -> None:
        super().validate()
        columns = list(self.cfg.text_columns)
        require(1 <= len(columns) <= 2, "task.text_columns", columns, "one column or a pair")
        require(self.primary_metric in self.cfg.metrics, "task.primary_metric", self.primary_metric,
                f"one of task.metrics {list(self.cfg.metrics)}")

    @property
    def head_kind(self) -> str:
        return "regression" if self.num_labels == 1 else "classification"

    def encode(self, tokenizer, raw: datasets.Dataset) -> datasets.Dataset:
        columns = list(self.cfg.text_columns)
        max_len = int(self.cfg.max_seq_len)

        def tokenize(batch):
            texts = [batch[c] for c in columns]
            return tokenizer(*texts, truncation="longest_first" if len(texts) == 2 else True, max_length=max_len)

        keep = {"idx", "label"}
        encoded = raw.map(tokenize, batched=True, remove_columns=[c for c in raw.column_names if c not in keep],
                          desc=f"tokenize {self.name}")
        return encoded

    def check_labels(self, split: str, raw: datasets.Dataset, source_split: str) -> None:
        """Every label a class id in [0, num_labels) (STS-B: a finite score), so that no split is scored against
        labels the head cannot predict. A split whose labels are all -1 is a test split (GLUE hides its labels)."""
        labels = raw.with_format("numpy", columns=["label"])[:]["label"]  # from Arrow; raw["label"] is Python ints
        if len(labels) and (labels < 0).all():
            raise DataError(f"task {self.name}: split {split!r} ({self.split_source(source_split)}) has no labels "
                            "(every label is -1: a test split?); evaluate on a validation split")
        if self.head_kind == "regression":
            bad = labels[~np.isfinite(labels.astype(float))]
            allowed = "finite numbers"
        else:
            bad = labels[(labels < 0) | (labels >= self.num_labels) | (labels != np.round(labels))]
            allowed = f"class ids 0..{self.num_labels - 1} (task.num_labels={self.num_labels})"
        if len(bad):
            values = sorted({float(v) if self.head_kind == "regression" else int(v) for v in bad})
            raise DataError(f"task {self.name}: split {split!r} ({self.split_source(source_split)}), column 'label': "
                            f"{len(bad)} rows have labels {values[:10]}, but labels must be {allowed}; fix the file "
                            "or task.num_labels")

    def datasets(self, tokenizer, seed: int):
        train_raw, evals_raw = self.train_and_eval_raw()
        self.train_raw = train_raw  # its texts group the rows for train.selection=heldout
        source = self.cfg.holdout.source_split if self.protocol == "holdout" else self.cfg.train_split
        self.check_labels("train" if self.protocol == "standard" else f"{source} (training part)", train_raw, source)
        for name, raw in evals_raw.items():
            self.check_labels(name, raw, name)
        train = self.cached(tokenizer, "train", train_raw, lambda r: self.encode(tokenizer, r))
        evals = {name: self.cached(tokenizer, name, raw, lambda r: self.encode(tokenizer, r))
                 for name, raw in evals_raw.items()}
        train = self.limit(train, "max_train_samples")
        evals = {name: self.limit(ds, "max_eval_samples") for name, ds in evals.items()}
        return train, evals

    def text_groups(self, train: datasets.Dataset):
        position = {idx: row for row, idx in enumerate(self.train_raw["idx"])}
        rows = self.train_raw.select([position[idx] for idx in train["idx"]])
        return shared_value_groups(rows.select_columns(list(self.cfg.text_columns)).to_pandas())

    def collate(self, tokenizer):
        pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        regression = self.head_kind == "regression"

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = pad([{k: v for k, v in r.items() if k not in ("idx", "label")} for r in rows])
            batch["labels"] = torch.tensor([r["label"] for r in rows],
                                           dtype=torch.float32 if regression else torch.long)
            batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
            return batch

        return collate

    def model_inputs(self, batch, training: bool):
        return {k: v for k, v in batch.items() if k != "idx" and (training or k != "labels")}

    def batch_outputs(self, batch, outputs):
        logits = outputs.logits.float()
        prediction = logits.squeeze(-1) if self.head_kind == "regression" else logits.argmax(-1)
        return {"idx": batch["idx"].cpu().numpy(), "label": batch["labels"].cpu().numpy(),
                "prediction": prediction.cpu().numpy()}

    def score(self, split, dataset, outputs):
        metrics = glue_metrics(list(self.cfg.metrics), outputs["prediction"], outputs["label"])
        suffix = self.metric_suffix(split)
        predictions = pd.DataFrame({"split": split, "idx": outputs["idx"], "label": outputs["label"],
                                    "prediction": outputs["prediction"]})
        return {f"{name}{suffix}": value for name, value in metrics.items()}, predictions
