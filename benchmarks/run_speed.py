"""The README's main job four ways, interleaved on one machine: today's harness, the harness length-grouped + bf16,
the recommended command (length-grouped + precision=auto), and the transformers Trainer + peft at its best.

    HF_HUB_OFFLINE=1 python benchmarks/run_speed.py --seeds 0 1 --reps 1 --data-dir ../shared/data

The job: SST-2, LoRA (r=8 on query,value), all-MiniLM-L6-v2, 300 steps of 32, 128 tokens max, evaluation on the
872 validation sentences. The four ways:

- `today`: the harness as it was before length grouping, evaluation in length order and precision=auto (the
  commit `--baseline-ref`, unpacked with `git archive` into a temporary folder), fp32, random batches;
- `grouped_bf16`: this checkout, `train.group_by_length=true train.precision=bf16`;
- `recommended`: this checkout, `train.group_by_length=true train.precision=auto` (the command docs/speed.md
  recommends; auto is bf16 where the device computes it natively, else fp32);
- `trainer_best`: benchmarks/peft_baseline.py with `--group-by-length --bf16` (the Trainer's
  `train_sampling_strategy="group_by_length"` and `bf16=True`).

Every run is its own process with one torch thread (OMP_NUM_THREADS=1, HARNESS_THREADS=1), its own results folder
(nothing is skipped as already done) and the same warm token cache. Order: for each repetition and seed, the four
ways in an order that rotates, so a load change on a shared machine hits all of them alike. Reported per way: train
and eval samples/s (the row's, or the Trainer's own), the process's CPU seconds (user + sys: what the run cost,
less sensitive to other processes than wall time), wall seconds, accuracy per seed, the padding ratios; then the
ratios asked of the harness, taken pair by pair within each (repetition, seed) and summarised by min and median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
JOB = ["task=sst2", "variant=lora", "model=minilm", "train.max_steps=300"]
WAYS = ("today", "grouped_bf16", "recommended", "trainer_best")
HARNESS_SETTINGS = {"today": [], "grouped_bf16": ["train.group_by_length=true", "train.precision=bf16"],
                    "recommended": ["train.group_by_length=true", "train.precision=auto"]}


def unpack(ref: str, into: Path) -> Path:
    """The harness at `ref`, as files (no git metadata needed to run it)."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def timed_process(command: list[str], cwd: Path, env: dict) -> tuple[str, float, float, int]:
    """(output, wall seconds, CPU seconds user + sys, exit code) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return output, time.perf_counter() - start, usage.ru_utime + usage.ru_stime, process.returncode


def run_way(way: str, seed: int, rep: int, trees: dict[str, Path], scratch: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if way == "trainer_best":
        command = [sys.executable, "benchmarks/peft_baseline.py", "--task", "sst2", "--max-steps", "300",
                   "--seed", str(seed), "--data-dir", args.data_dir, "--group-by-length", "--bf16",
                   "--output-dir", str(scratch / f"trainer-{seed}-{rep}")]
        output, wall, cpu, code = timed_process(command, REPO, env)
        if code != 0:
            raise RuntimeError(f"{way} seed {seed} failed:\n{output[-3000:]}")
        result = json.loads(output.strip().splitlines()[-1])
        return {"way": way, "seed": seed, "rep": rep, "accuracy": result["accuracy"],
                "train_samples_per_s": result["train_samples_per_s"],
                "eval_samples_per_s": result["eval_samples_per_s"], "cpu_s": cpu, "wall_s": wall}
    results_dir = scratch / f"{way}-{seed}-{rep}"
    command = [sys.executable, "-m", "harness", *JOB, *HARNESS_SETTINGS[way], f"seed={seed}",
               f"data.dir={args.data_dir}", f"data.cache_dir={args.cache_dir}", f"results_dir={results_dir}",
               "device=cpu"]
    output, wall, cpu, code = timed_process(command, trees[way], env)
    rows = list(results_dir.glob("*/runs/*.parquet"))
    if code != 0 or len(rows) != 1:
        raise RuntimeError(f"{way} seed {seed} failed (exit {code}):\n{output[-3000:]}")
    row = pq.read_table(rows[0]).to_pylist()[0]
    return {"way": way, "seed": seed, "rep": rep, "accuracy": row["score_best"],
            "train_samples_per_s": row["train_samples_per_s"], "eval_samples_per_s": row["eval_samples_per_s"],
            "cpu_s": cpu, "wall_s": wall, "precision": row["precision"],
            "train_padding_ratio": row.get("train_padding_ratio"), "eval_padding_ratio": row.get("eval_padding_ratio"),
            "setup_s": row.get("setup_seconds"), "train_s": row["train_seconds"], "eval_s": row["eval_seconds"],
            "row_wall_s": row.get("wall_seconds")}


def summary(values: list[float]) -> str:
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}" if values else "-"


def report(measured: list[dict]) -> None:
    print("\n## per way (min / median / max over runs)")
    print(f"{'way':<13} {'train samples/s':>22} {'eval samples/s':>22} {'CPU s':>20} {'wall s':>20} "
          f"{'train pad':>9} {'eval pad':>8}  accuracy by seed")
    for way in WAYS:
        runs = [m for m in measured if m["way"] == way]
        pads = [f"{statistics.median(v):.3f}" if (v := [m[k] for m in runs if m.get(k)]) else "-"
                for k in ("train_padding_ratio", "eval_padding_ratio")]
        accuracy = ", ".join(f"{m['seed']}: {m['accuracy']:.4f}" for m in runs if m["rep"] == 0)
        print(f"{way:<13} {summary([m['train_samples_per_s'] for m in runs]):>22} "
              f"{summary([m['eval_samples_per_s'] for m in runs]):>22} {summary([m['cpu_s'] for m in runs]):>20} "
              f"{summary([m['wall_s'] for m in runs]):>20} {pads[0]:>9} {pads[1]:>8}  {accuracy}")

    def ratios(a: str, b: str, key: str, invert: bool = False) -> list[float]:
        found = []
        for m in measured:
            if m["way"] != a:
                continue
            other = next((o for o in measured if o["way"] == b and o["seed"] == m["seed"] and o["rep"] == m["rep"]), None)
            if other:
                found.append(other[key] / m[key] if invert else m[key] / other[key])
        return found

    print("\n## time outside training and evaluation (harness ways): seconds, % of wall; min / median / max")
    for way in WAYS:
        runs = [m for m in measured if m["way"] == way and m.get("train_s") is not None]
        if not runs:
            continue
        for clock, key in (("the row's wall (process start to the row)", "row_wall_s"),
                           ("the process's wall (its exit too)", "wall_s")):
            timed = [m for m in runs if m.get(key)]
            outside = [m[key] - m["train_s"] - m["eval_s"] for m in timed]
            share = [100 * o / m[key] for o, m in zip(outside, timed)]
            print(f"{way:<13} {clock:<43} {summary(outside):>20} s {summary(share):>20} %")
        print(f"{way:<13} {'of which setup (process start to first step)':<43} "
              f"{summary([m['setup_s'] for m in runs if m.get('setup_s')]):>20} s")

    print("\n## ratios, pair by pair within each (repetition, seed): min / median / max")
    for a, b, key, target in [("grouped_bf16", "today", "train_samples_per_s", ">= 4"),
                              ("grouped_bf16", "trainer_best", "train_samples_per_s", ">= 1.0"),
                              ("grouped_bf16", "today", "eval_samples_per_s", ">= 2.5"),
                              ("recommended", "today", "train_samples_per_s", ""),
                              ("recommended", "trainer_best", "train_samples_per_s", ""),
                              ("recommended", "today", "eval_samples_per_s", "")]:
        print(f"{a} / {b} {key}: {summary(ratios(a, b, key))}  (target {target or '-'})")
    for a, b in [("today", "grouped_bf16"), ("today", "recommended"), ("trainer_best", "grouped_bf16")]:
        print(f"CPU seconds {a} / {b}: {summary(ratios(a, b, 'cpu_s'))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--data-dir", default=str((REPO / ".." / "shared" / "data").resolve()))
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "harness"))
    parser.add_argument("--baseline-ref", default="a4ed08e",
                        help="the commit that is 'today' (default: the last one before length grouping)")
    parser.add_argument("--json", help="also write every run's measurements here")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; ways {args.ways}, seeds "
          f"{args.seeds}, {args.reps} repetition(s); today = {args.baseline_ref}", flush=True)
    measured = []
    with tempfile.TemporaryDirectory(prefix="run_speed-") as tmp:
        scratch = Path(tmp)
        trees = {"today": unpack(args.baseline_ref, scratch / "today-tree") if "today" in args.ways else REPO,
                 "grouped_bf16": REPO, "recommended": REPO}
        turn = 0
        for rep in range(args.reps):
            for seed in args.seeds:
                order = args.ways[turn % len(args.ways):] + args.ways[:turn % len(args.ways)]
                turn += 1
                for way in order:
                    m = run_way(way, seed, rep, trees, scratch, args)
                    measured.append(m)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1))
    report(measured)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
