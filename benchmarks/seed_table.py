"""The README's harness-vs-peft seed table and its tests, from the committed results alone.

    python benchmarks/seed_table.py                       # every seed both sides have
    python benchmarks/seed_table.py --seeds 16-31         # one block of seeds (the confirmatory replication)

Harness side: the `impl=ours` ok rows of results/sst2_vs_peft/ (made by the README's seed loop). peft side:
results/sst2_vs_peft/peft_baseline.jsonl, the last line `benchmarks/peft_baseline.py` printed for each seed.
Prints the markdown table, then the two-sided tests (Mann-Whitney U; Welch's t with the 95% confidence interval
of the difference of means, harness - peft), on the accuracies as printed (4 digits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu, ttest_ind

from harness import rows

FOLDER = Path(__file__).resolve().parent.parent / "results" / "sst2_vs_peft"


def seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_range, help="first-last, e.g. 16-31 (default: every seed both have)")
    args = parser.parse_args()

    ours_rows = rows.read_rows(FOLDER).query("impl == 'ours' and status == 'ok'").set_index("seed").sort_index()
    peft = {line["seed"]: line for line in map(json.loads, (FOLDER / "peft_baseline.jsonl").read_text().splitlines())}
    seeds = [s for s in (args.seeds or ours_rows.index) if s in ours_rows.index and s in peft]
    ours = [round(ours_rows.loc[s, "score_last"], 4) for s in seeds]
    theirs = [peft[s]["accuracy"] for s in seeds]
    ours_speed = [ours_rows.loc[s, "train_samples_per_s"] for s in seeds]
    theirs_speed = [peft[s]["train_samples_per_s"] for s in seeds]

    print("| seed | harness accuracy | peft accuracy | harness train samples/s | peft train samples/s "
          "| harness saved activations (first batch) |")
    print("|---|---:|---:|---:|---:|---:|")
    for s, a, b, speed_a, speed_b in zip(seeds, ours, theirs, ours_speed, theirs_speed):
        shape = ours_rows.loc[s, "activation_batch_shape"].replace("x", "×")
        print(f"| {s} | {a:.4f} | {b:.4f} | {speed_a:.2f} | {speed_b:.2f} "
              f"| {int(ours_rows.loc[s, 'saved_activation_bytes']):,} B ({shape}) |")
    print(f"| median | {np.median(ours):.4f} | {np.median(theirs):.4f} | {np.median(ours_speed):.2f} "
          f"| {np.median(theirs_speed):.2f} | |")
    print(f"| mean ± sd | {np.mean(ours):.4f} ± {np.std(ours, ddof=1):.4f} "
          f"| {np.mean(theirs):.4f} ± {np.std(theirs, ddof=1):.4f} | | | |")

    welch = ttest_ind(ours, theirs, equal_var=False)
    low, high = welch.confidence_interval(0.95)
    print(f"\n{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}); peft ahead on {sum(a < b for a, b in zip(ours, theirs))}, "
          f"harness ahead on {sum(a > b for a, b in zip(ours, theirs))}")
    print(f"mean difference harness - peft: {np.mean(ours) - np.mean(theirs):+.4f} "
          f"(95% CI {low:+.4f} to {high:+.4f}, Welch)")
    print(f"two-sided p: Mann-Whitney U {mannwhitneyu(ours, theirs).pvalue:.3f}, Welch t {welch.pvalue:.3f}")
    print(f"train samples/s, largest per-seed gap: {max(abs(a / b - 1) for a, b in zip(ours_speed, theirs_speed)):.1%}")


if __name__ == "__main__":
    main()
