"""The measured decisions of docs/speed.md: do length-grouped batches and bf16 autocast change the scores?

    python benchmarks/speed_decisions.py            # reads the committed rows under results/

Each comparison holds everything fixed but one setting and pairs runs by seed (same seed: same initialisation of
head and adapter, same data order up to the grouping). Rows of the unchanged setting come from the sweeps that
made them (results/sst2_vs_peft, results/cpu_glue: their run_keys are those of today's config with the setting at
its old value) and the changed setting from results/speed_<task>. Tests (scipy), over the seeds both arms have:
Welch's t-test, the paired t-test, and Wilcoxon's signed-rank test from 6 pairs. The rule: the two agree within
seed noise when neither t-test rejects at 5% and the mean paired difference is smaller than the seed-to-seed
standard deviation of the config as it was (over all its seeds: 32 for SST-2, 3 for STS-B, 8 for MRPC).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.rows import read_rows  # noqa: E402

SST2 = {"task": "sst2", "variant": "lora", "max_steps": 300}
CPU_GLUE = {"max_steps": None}
TODAY = {"group_by_length": False, "precision": "fp32"}
MRPC_TODAY = ("cpu_glue", "speed_mrpc")  # seeds 0-2 in cpu_glue's rows, seeds 3-7 added in speed_mrpc
NOISE = {"sst2": ("sst2_vs_peft", TODAY), "stsb": ("cpu_glue", TODAY), "mrpc": (MRPC_TODAY, TODAY)}
# (name, task filter, (sweep, settings) of arm A = unchanged, (sweep, settings) of arm B = changed)
COMPARISONS = [
    ("SST-2 LoRA 300 steps: group_by_length off -> on (fp32)", SST2,
     ("sst2_vs_peft", {"group_by_length": False, "precision": "fp32"}),
     ("speed_sst2", {"group_by_length": True, "precision": "fp32"})),
    ("SST-2 LoRA 300 steps: fp32 -> bf16 (grouped)", SST2,
     ("speed_sst2", {"group_by_length": True, "precision": "fp32"}),
     ("speed_sst2", {"group_by_length": True, "precision": "bf16"})),
    ("SST-2 LoRA 300 steps: today -> grouped + bf16", SST2,
     ("sst2_vs_peft", {"group_by_length": False, "precision": "fp32"}),
     ("speed_sst2", {"group_by_length": True, "precision": "bf16"})),
    ("STS-B LoRA (cpu_glue budget): group_by_length off -> on", {"task": "stsb", "variant": "lora"},
     ("cpu_glue", {"group_by_length": False, "precision": "fp32"}),
     ("speed_stsb", {"group_by_length": True, "precision": "fp32"})),
    ("MRPC LoRA+ (cpu_glue budget): group_by_length off -> on", {"task": "mrpc", "variant": "lora_plus"},
     (MRPC_TODAY, {"group_by_length": False, "precision": "fp32"}),
     ("speed_mrpc", {"group_by_length": True, "precision": "fp32"})),
    ("MRPC LoRA+ (cpu_glue budget): fp32 -> bf16 (grouped)", {"task": "mrpc", "variant": "lora_plus"},
     ("speed_mrpc", {"group_by_length": True, "precision": "fp32"}),
     ("speed_mrpc", {"group_by_length": True, "precision": "bf16"})),
]


def arm(rows, where: dict, sweeps: str | tuple[str, ...], settings: dict) -> dict[int, float]:
    """{seed: score_best} of the ok rows of the sweep(s) matching `where` and the train settings."""
    sweeps = (sweeps,) if isinstance(sweeps, str) else sweeps
    picked = rows[rows.sweep.isin(sweeps) & (rows.status == "ok")]
    for column, value in where.items():
        picked = picked[picked[column].isna()] if value is None else picked[picked[column] == value]
    scores = {}
    for row in picked.to_dict("records"):
        train = json.loads(row["config_json"])["train"]
        if bool(train.get("group_by_length", False)) != settings["group_by_length"]:
            continue
        if row["precision"] != settings["precision"]:
            continue
        scores[int(row["seed"])] = float(row["score_best"])
    return scores


def compare(name: str, a: dict[int, float], b: dict[int, float], reference: dict[int, float]) -> None:
    print(f"\n### {name}")
    if len(a) < 2 or len(b) < 2:
        print(f"not enough seeds yet: {len(a)} and {len(b)}")
        return
    both = sorted(set(a) & set(b))
    if len(both) < 2:
        print(f"fewer than 2 common seeds: {both}")
        return
    noise = np.std(list(reference.values()), ddof=1)
    da = np.array([a[s] for s in both])
    db = np.array([b[s] for s in both])
    diff = db - da
    welch = stats.ttest_ind(db, da, equal_var=False)
    paired = stats.ttest_rel(db, da)
    half = stats.t.ppf(0.975, len(both) - 1) * diff.std(ddof=1) / np.sqrt(len(both)) if diff.std() else 0.0
    print(f"seed noise: {len(reference)} seeds of the baseline config: mean {np.mean(list(reference.values())):.4f}, "
          f"sd {noise:.4f}")
    print(f"{len(both)} common seeds ({both[0]}-{both[-1]}): unchanged mean {da.mean():.4f} (sd {da.std(ddof=1):.4f}), "
          f"changed mean {db.mean():.4f} (sd {db.std(ddof=1):.4f})")
    line = (f"difference {diff.mean():+.4f} (paired 95% CI {diff.mean() - half:+.4f} .. {diff.mean() + half:+.4f}); "
            f"Welch t-test p = {welch.pvalue:.3f}; paired t-test p = {paired.pvalue:.3f}")
    if len(both) >= 6 and np.any(diff):
        line += f"; Wilcoxon signed-rank p = {stats.wilcoxon(db, da).pvalue:.3f}"
    print(line)
    print("per seed: " + ", ".join(f"{s}: {a[s]:.4f} -> {b[s]:.4f}" for s in both))
    nan_safe = lambda p: np.isnan(p) or p >= 0.05  # noqa: E731 - identical arms give NaN: nothing rejected
    agree = nan_safe(welch.pvalue) and nan_safe(paired.pvalue) and abs(diff.mean()) < noise
    print(f"verdict: {'agree within seed noise' if agree else 'DIFFERENT (or not shown to agree)'} "
          f"(|difference| {abs(diff.mean()):.4f} vs seed sd {noise:.4f})")


def main() -> None:
    rows = read_rows(REPO / "results")
    for name, where, (sweep_a, settings_a), (sweep_b, settings_b) in COMPARISONS:
        a = arm(rows, where, sweep_a, settings_a)
        # the seed-to-seed spread: of the config as it was (32 seeds for SST-2), whichever arm is compared
        reference = arm(rows, where, *NOISE[where["task"]])
        compare(name, a, arm(rows, where, sweep_b, settings_b), reference)


if __name__ == "__main__":
    main()
