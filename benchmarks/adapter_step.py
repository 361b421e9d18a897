"""Our adapter layers against peft's: training-step time, saved-activation bytes, merged vs unmerged inference.

    HF_HUB_OFFLINE=1 python benchmarks/adapter_step.py                      # MiniLM and roberta-base shape
    HF_HUB_OFFLINE=1 python benchmarks/adapter_step.py --models minilm --variants lora dora --reps 5
    HF_HUB_OFFLINE=1 python benchmarks/adapter_step.py --crossover --reps 7   # merged vs composed by tokens/batch

For each model (all-MiniLM-L6-v2 from its package; roberta-base built at random from its YAML) and each
adapter variant, the variant is injected by the harness (`variant.impl=ours` and, where peft has it,
`variant.impl=peft`) into the same base model (each built by `harness.assemble` from seed 0), and both are timed
on the same batch (32 x 128 tokens, fp32, train mode) in one process: one training step is forward + backward + AdamW step (+ the
variant's before/after-step hooks), repetitions interleaved so that load from other processes hits every
model alike. Each variant's group also holds our LoRA and peft's LoRA, so "over LoRA" ratios compare
models timed side by side. Saved-activation bytes are the trainer's own account (`SavedTensorMeter`).
Inference: eval forward of the same batch, unmerged and after `merge()` of every adapted layer.

Variants share one setting so that differences are the method's: r=8, alpha=8 (VeRA: its YAML's r=1024),
query+value, dropout 0 (QLoRA too: only its base differs from LoRA).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import logging as transformers_logging  # noqa: E402

from harness.assemble import assemble  # noqa: E402
from harness.adapters import VARIANTS  # noqa: E402
from harness.adapters.inject import AdapterVariant  # noqa: E402
from harness.inspect import compose_config  # noqa: E402
from harness.train import SavedTensorMeter  # noqa: E402

transformers_logging.set_verbosity_error()
MIB = 2**20
COMMON = ["variant.targets=[query,value]", "variant.all_linear=false", "variant.dropout=0.0"]


def variant_overrides(name: str) -> list[str]:
    rank = [] if name == "vera" else ["variant.r=8", "variant.alpha=8"]
    return [f"variant={name}", *rank, *COMMON]


class Subject:
    """One model with one variant in one implementation, with its optimizer, ready to step.

    name="floor" is the frozen backbone with no adapter, its first layer's query and value biases trained (plus
    the head): gradients then flow exactly as deep as a query+value adapter needs (to those layers' outputs, not
    to the embeddings), so the floor is the step every adapter pays before its own cost.
    """

    def __init__(self, name: str, impl: str, model_name: str):
        overrides = ["variant=head"] if name == "floor" else [f"variant.impl={impl}", *variant_overrides(name)]
        cfg = compose_config([*model_overrides(model_name), "task=mrpc", *overrides])
        self.label = f"{name}/{impl}"
        setup = assemble(cfg, with_tokenizer=False)  # seed 0: every subject starts from the same base weights
        self.model, self.variant = setup.model, setup.variant
        if name == "floor":
            first = self.model.base_model.encoder.layer[0].attention.self
            first.query.bias.requires_grad_(True)
            first.value.bias.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.variant.param_groups(self.model, 5e-4, 0.1), lr=5e-4)
        self.variant_state = self.variant.start_training(self.model, seed=0)
        self.step_count = 0
        self.times: list[float] = []
        self.saved_bytes: int | None = None

    def step(self, batch: dict, measure: bool = False) -> float:
        self.model.train()
        start = time.perf_counter()
        self.variant.before_step(self.model, self.step_count, self.variant_state)
        meter = SavedTensorMeter(self.model) if measure else None
        if meter:
            meter.__enter__()
        loss = self.model(**batch).loss
        loss.backward()
        if meter:
            meter.__exit__(None, None, None)
            self.saved_bytes = meter.bytes
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.variant.after_step(self.model, self.step_count, self.variant_state)
        self.step_count += 1
        return time.perf_counter() - start

    def adapted_layers(self) -> list[torch.nn.Module]:
        return [m for m in self.model.modules() if callable(getattr(m, "merge", None))
                and callable(getattr(m, "unmerge", None)) and m is not self.model]

    @torch.inference_mode()
    def inference_times(self, batch: dict, reps: int) -> tuple[float, float]:
        """Median eval-forward seconds unmerged, then merged (every adapted layer merged)."""
        self.model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self.model(**inputs)
        unmerged = statistics.median(timed(lambda: self.model(**inputs)) for _ in range(reps))
        for layer in self.adapted_layers():
            layer.merge()
        self.model(**inputs)
        merged = statistics.median(timed(lambda: self.model(**inputs)) for _ in range(reps))
        for layer in self.adapted_layers():
            layer.unmerge()
        return unmerged, merged


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_overrides(model_name: str) -> list[str]:
    """MiniLM from its package; larger shapes built at random (nothing to download, same cost per step)."""
    return [f"model={model_name}"] + (["model.init=random"] if model_name != "minilm" else [])


def run_group(subjects: list[Subject], batch: dict, reps: int) -> None:
    """Warm up (and count saved bytes), then time `reps` interleaved rounds; the order rotates every round."""
    for subject in subjects:
        subject.step(batch, measure=True)
    for rep in range(reps):
        order = subjects[rep % len(subjects):] + subjects[: rep % len(subjects)]
        for subject in order:
            subject.times.append(subject.step(batch))


def median(subject: Subject) -> float:
    return statistics.median(subject.times)


def benchmark_model(model_name: str, variants: list[str], reps: int, batch_size: int, seq_len: int) -> None:
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, seq_len), generator=generator),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,), generator=generator)}
    print(f"\n## {model_name}: batch {batch_size}x{seq_len}, fp32, {torch.get_num_threads()} threads, "
          f"{reps} interleaved reps (median step seconds)")
    print("floor: the same step with no adapter (gradients down to the first layer's query and value); "
          "'+ms' columns: a variant's step minus the floor timed beside it")
    print(f"{'variant':<11} {'ours s':>7} {'peft s':>7} {'ours/peft':>9} {'ours +ms':>8} {'peft +ms':>8} "
          f"{'ours/LoRA':>9} {'peft/LoRA':>9} {'saved MiB ours':>14} {'peft':>7} {'infer ms unmerged':>17} {'merged':>7}")
    summary = {}
    for name in variants:
        has_peft = VARIANTS[name].peft_supported
        floor = Subject("floor", "ours", model_name)
        lora_ours, lora_peft = Subject("lora", "ours", model_name), Subject("lora", "peft", model_name)
        group = [floor, lora_ours, lora_peft]
        ours = peft = None
        if name != "lora":
            ours = Subject(name, "ours", model_name)
            peft = Subject(name, "peft", model_name) if has_peft else None
            group += [s for s in (ours, peft) if s is not None]
        else:
            ours, peft = lora_ours, lora_peft
        run_group(group, batch, reps)
        unmerged, merged = ours.inference_times(batch, max(3, reps // 2))
        row = {"ours": median(ours), "peft": median(peft) if peft else None, "floor": median(floor),
               "ours_lora": median(ours) / median(lora_ours),
               "peft_lora": median(peft) / median(lora_peft) if peft else None,
               "saved_ours": ours.saved_bytes, "saved_peft": peft.saved_bytes if peft else None,
               "saved_lora": lora_ours.saved_bytes}
        summary[name] = row
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{name:<11} {row['ours']:>7.3f} {fmt(row['peft'], '>7.3f')} "
              f"{fmt(row['ours'] / row['peft'] if peft else None, '>9.3f')} {1e3 * (row['ours'] - row['floor']):>8.0f} "
              f"{fmt(1e3 * (row['peft'] - row['floor']) if peft else None, '>8.0f')} {row['ours_lora']:>9.3f} "
              f"{fmt(row['peft_lora'], '>9.3f')} {row['saved_ours'] / MIB:>14.1f} "
              f"{fmt(row['saved_peft'] / MIB if peft else None, '>7.1f')} {unmerged * 1e3:>17.1f} {merged * 1e3:>7.1f}",
              flush=True)
        del group, floor, lora_ours, lora_peft, ours, peft
    print_targets(model_name, summary)


def print_targets(model_name: str, summary: dict) -> None:
    lines = []
    if "lora" in summary:
        lora = summary["lora"]
        lines.append(f"LoRA step ours/peft = {lora['ours'] / lora['peft']:.3f} (target <= 0.95; the no-adapter floor "
                     f"is {lora['floor'] / lora['peft']:.3f} of peft's step); adapter cost over the floor: ours "
                     f"{1e3 * (lora['ours'] - lora['floor']):.0f} ms, peft {1e3 * (lora['peft'] - lora['floor']):.0f} ms")
    if "dora" in summary:
        d = summary["dora"]
        lines.append(f"DoRA over LoRA: ours {100 * (d['ours_lora'] - 1):+.1f}% (target <= +5%), "
                     f"peft {100 * (d['peft_lora'] - 1):+.1f}%; DoRA step ours/peft = {d['ours'] / d['peft']:.3f}")
    over = [n for n, r in summary.items() if r["saved_peft"] is not None and r["saved_ours"] > r["saved_peft"]]
    lines.append("saved-activation bytes ours <= peft for every variant peft has" if not over
                 else f"saved-activation bytes ABOVE peft's for: {', '.join(over)}")
    print(f"\n{model_name}: " + "\n{0}: ".format(model_name).join(lines))


CROSSOVER_TOKENS = (128, 512, 2048, 4096)


def set_merged_path(model: torch.nn.Module, min_tokens: int) -> None:
    for module in model.modules():
        if hasattr(module, "merged_path_min_tokens"):
            module.merged_path_min_tokens = min_tokens


def crossover(model_name: str, variants: list[str], reps: int, batch_size: int) -> None:
    """LoRA-family step time through the merged weight against the composed ops, at each tokens-per-batch count,
    and whether the path the layer picks by itself (its `merged_path_min_tokens`) is the faster one."""
    probe = Subject("lora", "ours", model_name)
    threshold = next(m.merged_path_min_tokens for m in probe.model.modules() if hasattr(m, "merged_path_min_tokens"))
    del probe
    print(f"\n## {model_name}: merged-weight vs composed path, batch {batch_size} x (tokens / {batch_size}), fp32, "
          f"{torch.get_num_threads()} threads, {reps} interleaved reps (median step ms); the layer picks merged from "
          f"{threshold} tokens")
    print(f"{'variant':<8} {'tokens':>6} {'merged ms':>9} {'composed ms':>11} {'merged/composed':>15} {'picked':>8} "
          f"{'picked/best':>11}")
    for name in variants:
        crossing = None
        for tokens in CROSSOVER_TOKENS:
            seq_len = max(1, tokens // batch_size)
            generator = torch.Generator().manual_seed(0)
            batch = {"input_ids": torch.randint(1000, 20000, (batch_size, seq_len), generator=generator),
                     "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                     "labels": torch.randint(0, 2, (batch_size,), generator=generator)}
            merged, composed = (Subject(name, "ours", model_name) for _ in range(2))
            set_merged_path(merged.model, 0)
            set_merged_path(composed.model, 2**62)
            run_group([merged, composed], batch, reps)
            m, c = median(merged), median(composed)
            picked = m if batch_size * seq_len >= threshold else c
            if crossing is None and m < c:
                crossing = tokens
            print(f"{name:<8} {batch_size * seq_len:>6} {1e3 * m:>9.1f} {1e3 * c:>11.1f} {m / c:>15.3f} "
                  f"{'merged' if picked == m else 'composed':>8} {picked / min(m, c):>11.3f}", flush=True)
        print(f"{model_name} {name}: merged is faster from {crossing if crossing else 'none'} of "
              f"{list(CROSSOVER_TOKENS)} tokens per batch")


def main() -> None:
    adapter_variants = sorted(n for n, cls in VARIANTS.items() if issubclass(cls, AdapterVariant))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "roberta_base"])
    parser.add_argument("--variants", nargs="+", default=["lora"] + [v for v in adapter_variants if v != "lora"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--crossover", action="store_true",
                        help=f"time the merged-weight path against the composed one at {CROSSOVER_TOKENS} tokens per "
                             "batch (variants: lora and dora unless --variants is given)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.2f}")
    for model_name in args.models:
        if args.crossover:
            chosen = [v for v in args.variants if v in ("lora", "dora")] if "--variants" not in sys.argv else args.variants
            crossover(model_name, chosen, args.reps, args.batch_size)
        else:
            benchmark_model(model_name, args.variants, args.reps, args.batch_size, args.seq_len)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
