"""The report: the paper-style results table, which differences are real, efficiency, parameter counts, plots.

    python -m harness.report results/cpu_glue            # writes results/cpu_glue/report/
    python -m harness.report results/cpu_glue --check    # regenerate the tables, fail with a diff if they changed

Reads every row under the given results folders (`<dir>/runs/*.parquet` or `<dir>/<sweep>/runs/*.parquet`)
and writes next to them (`<dir>/report/`, or `--out`):

  table.md / .tex / .csv          the LoRA paper's Table 2 for our rows: one row per variant (and rank, and
                                  implementation when peft rows exist), trainable parameters without the head,
                                  one column per task's metric, the average; median over seeds ± std, best
                                  in bold, variants a paired bootstrap cannot tell from the best underlined
  efficiency.md / .tex / .csv     throughput, measured peak memory, the exact memory account, adapter size
  param_counts.md / .tex / .csv   our trainable-parameter counts of roberta-base/large next to the papers'
  plots/*.png, plots/*.svg        score vs rank, score vs parameters (Pareto front), efficiency, training
                                  curves, DyLoRA's rank curve
  README.md                       all of the above on one page

Only `ok` rows enter the tables; the others are listed under the results table. Everything is a function
of the committed rows (and, for parameter counts, of the code) and is deterministic, so `--check` can
regenerate the text outputs in CI and compare them byte for byte. The notebook
notebooks/compare_variants.ipynb calls the same functions (`load`, `select`, `paper_table`, ...).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import re
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from harness import results as results_io
from harness.errors import HarnessError
from harness.metrics import constant_predictions, glue_metrics


class ReportError(HarnessError):
    """The rows cannot make a report (none found, mixed configs, ...); the message says how to fix it."""


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
TEXT_SUFFIXES = (".md", ".tex", ".csv")  # what --check compares (plots are regenerated, not compared)
RESAMPLES, LEVEL, SEED = 1000, 0.95, 0
# The bootstrap scores fractions (GLUE metrics as harness.metrics returns them; SQuAD's per-example exact/F1
# columns are 0..1), while the table shows points (GLUE x100; SQuAD's row metrics are 0..100 already).
BOOTSTRAP_SCALE = 100.0


def variant_label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def column_label(task: str, metric: str, primary: bool) -> str:
    if (task, metric) in COLUMN_LABELS:
        return COLUMN_LABELS[(task, metric)]
    name = TASK_LABELS.get(task, task)
    return name if primary else f"{name} {METRIC_LABELS.get(metric, metric)}"


# ---- loading -----------------------------------------------------------------------------------------
def load(*dirs: str | Path) -> pd.DataFrame:
    """Every row under `dirs` (all statuses), with the columns the report adds.

    Added: `group` (model|variant|rank|impl, the table's row key), `holdout` (the row's protocol is not
    the standard split), `kind` (task kind from the row's config: glue, squad, ...) and `artifacts` (the
    folder with the run's history and predictions).
    """
    if not dirs:
        raise ReportError("give at least one results folder, e.g. `python -m harness.report results/cpu_glue`")
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise ReportError(f"results folder {str(folder)!r} does not exist; pass the folder a sweep wrote "
                              "(results/<sweep_name>) or one holding several sweeps (results)")
    rows = results_io.read_rows(*dirs)
    if rows.empty:
        raise ReportError(
            f"no results rows under {', '.join(map(str, dirs))}: expected <dir>/runs/<run_key>.parquet or "
            "<dir>/<sweep>/runs/<run_key>.parquet. Run something first, e.g. "
            "`python -m harness +sweep=smoke` (rows go to results/<sweep_name>/runs/)")
    rows = rows.copy()
    rows["rank"] = rows["rank"].astype("Int64")
    rows["impl"] = rows["impl"].fillna("ours")
    rows["holdout"] = rows["protocol"].fillna("").str.startswith("holdout")
    rows["kind"] = [json.loads(c).get("task", {}).get("kind") if isinstance(c, str) else None
                    for c in rows["config_json"]]
    rows["group"] = [group_key(m, v, r, i) for m, v, r, i in zip(rows.model, rows.variant, rows["rank"], rows.impl)]
    rows["artifacts"] = [str(find_artifacts(dirs, sweep, key)) for sweep, key in zip(rows.sweep, rows.run_key)]
    order = sorted(range(len(rows)), key=lambda i: (group_sort_key(rows.iloc[i]), str(rows.task.iloc[i]),
                                                    int(rows.seed.iloc[i]) if pd.notna(rows.seed.iloc[i]) else -1,
                                                    rows.run_key.iloc[i]))
    return rows.iloc[order].reset_index(drop=True)


# Which evaluation a table reports (`--selection`): the predictions' checkpoint name and the row's score column.
SELECTIONS = {"eval_best": ("best", "score_best"), "last": ("last", "score_last"), "heldout": ("selected", "score_selected")}
SELECTION_CAPTIONS = {
    "eval_best": "Every run is scored at its best evaluation on the reported validation split (eval_best: the LoRA "
                 "paper's protocol, optimistic: the maximum over a run's evaluations)",
    "last": "Every run is scored at its last evaluation (--selection last: no selection on the reported split)",
    "heldout": "Every run is scored at the evaluation that scored best on a held-out slice of its training data "
               "(--selection heldout; runs trained with train.selection=heldout only)",
}


def apply_selection(rows: pd.DataFrame, selection: str = "eval_best") -> pd.DataFrame:
    """`rows` with metric_* (and score_best, which the plots read) taken at the evaluation `selection` names, and
    the columns `checkpoint` (the predictions to test and to check for constancy) and `degenerate`.

    eval_best keeps the rows as written; last reads each row's last_metrics_json; heldout keeps the rows trained
    with train.selection=heldout and reads their history at the selected step. `degenerate` is recomputed from
    the saved predictions at that checkpoint, so rows written before the column existed get it too."""
    if selection not in SELECTIONS:
        raise ReportError(f"--selection {selection!r}: use one of {', '.join(SELECTIONS)}")
    checkpoint, score = SELECTIONS[selection]
    rows = rows.copy()
    for column in ("selection", "score_selected", "selected_step", "degenerate", "last_metrics_json"):
        if column not in rows:
            rows[column] = None
    ok = rows.status == "ok"
    if selection == "heldout":
        rows = rows[~ok | (rows.selection == "heldout")].copy()
        ok = rows.status == "ok"
    metric_columns = [c for c in rows if c.startswith("metric_")]
    for i in rows.index[ok]:
        values = None
        if selection == "last" and isinstance(rows.at[i, "last_metrics_json"], str):
            values = json.loads(rows.at[i, "last_metrics_json"])
        elif selection == "heldout":
            history = Path(rows.at[i, "artifacts"]) / "history.parquet"
            if history.exists():
                frame = pd.read_parquet(history)
                frame = frame[frame["setting"].isna()] if "setting" in frame else frame
                hit = frame[frame.step == rows.at[i, "selected_step"]]
                values = hit.iloc[0].to_dict() if len(hit) else None
        if values is not None:
            for column in metric_columns:
                rows.at[i, column] = values.get(column.removeprefix("metric_"))
        if selection != "eval_best":
            rows.at[i, "score_best"] = rows.at[i, score]  # the plots and the rank curve read score_best
    rows["checkpoint"] = checkpoint
    rows["degenerate"] = [degenerate_at(a, checkpoint, d if (sel or "eval_best") == selection else None)
                          if status == "ok" else None
                          for a, status, d, sel in zip(rows.artifacts, rows.status, rows.degenerate, rows.selection)]
    return rows


def degenerate_at(artifacts: str | Path, checkpoint: str, recorded=None) -> bool | None:
    """Whether the run's predictions at `checkpoint` are constant (harness.metrics.constant_predictions); the
    row's own `degenerate` when the predictions were not saved."""
    frame = read_predictions(artifacts, checkpoint)
    if frame is None or frame.empty:
        return None if recorded is None or pd.isna(recorded) else bool(recorded)
    return constant_predictions(frame)


def budget_warnings(ok: pd.DataFrame) -> list[str]:
    """One line per task whose rows trained on different budgets (epochs, steps, max length, training rows)."""
    def budget(config: str) -> str:
        cfg = json.loads(config)
        train, data = cfg.get("train", {}), cfg.get("data", {})
        parts = {"epochs": train.get("epochs") if train.get("max_steps") is None else None,
                 "max_steps": train.get("max_steps"), "max_seq_len": cfg.get("task", {}).get("max_seq_len"),
                 "max_train_samples": data.get("max_train_samples")}
        return ", ".join(f"{k}={v}" for k, v in parts.items() if v is not None)

    lines = []
    for task, part in ok.groupby("task", sort=False):
        budgets = part.assign(budget=[budget(c) for c in part.config_json]).groupby("budget").variant.agg(
            lambda v: ", ".join(sorted(set(v))))
        if len(budgets) > 1:
            lines.append(f"Training budgets differ on {TASK_LABELS.get(task, task)}: "
                         + "; ".join(f"{b} ({v})" for b, v in budgets.items()))
    return lines


def inflation_table(rows: pd.DataFrame) -> str:
    """Markdown: per variant (row) and task (column), the median over seeds of score_best − score_last in points
    (x100 for GLUE): how much the papers' eval_best protocol adds over reporting the last evaluation."""
    ok = ok_rows(rows)
    tasks = sorted(set(ok.task), key=task_position)
    lines = ["| Method | r | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Mean |",
             "|:---|---:|" + "---:|" * (len(tasks) + 1)]
    for group, part in ok.groupby("group", sort=False):
        gaps = [((p.score_best - p.score_last) * task_scale(ok, t)).median()
                for t in tasks for p in [part[part.task == t]]]
        first = part.iloc[0]
        rank = "–" if pd.isna(first["rank"]) else str(int(first["rank"]))
        lines.append(f"| {variant_label(first.variant)} | {rank} | "
                     + " | ".join("–" if pd.isna(g) else f"{g:.1f}" for g in gaps)
                     + f" | {np.nanmean(gaps):.1f} |")
    return "\n".join(lines) + "\n"


def find_artifacts(dirs: Sequence[str | Path], sweep: str, key: str) -> Path:
    """The run's sibling folder (history, predictions), whichever of the two layouts `dirs` use."""
    candidates = [Path(d) / "runs" / key for d in dirs] + [Path(d) / sweep / "runs" / key for d in dirs]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def group_key(model, variant, rank, impl) -> str:
    return f"{model}|{variant}|{'' if pd.isna(rank) else int(rank)}|{impl}"


def group_sort_key(row) -> tuple:
    """Model, then the baselines in the paper's order, then the other variants by name, rank and impl."""
    variant = row["variant"]
    position = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
    rank = -1 if pd.isna(row["rank"]) else int(row["rank"])
    return (str(row["model"]), position, str(variant), rank, row["impl"] != "ours", str(row["impl"]))


def select(rows: pd.DataFrame, tasks: Iterable[str] | None = None, variants: Iterable[str] | None = None,
           ranks: Iterable[int] | None = None, models: Iterable[str] | None = None) -> pd.DataFrame:
    """The rows of the chosen tasks, variants, ranks and models (None keeps all).

    A rank filter keeps rank-free variants (full, head, bitfit): they are the baselines every rank is
    compared with; drop them with `variants`.
    """
    keep = pd.Series(True, index=rows.index)
    for column, wanted in (("task", tasks), ("variant", variants), ("model", models)):
        if wanted is not None:
            wanted = set(wanted)
            unknown = wanted - set(rows[column].dropna())
            if unknown:
                raise ReportError(f"{column} {sorted(unknown)} not in these rows; they have "
                                  f"{sorted(set(rows[column].dropna()))}")
            keep &= rows[column].isin(wanted)
    if ranks is not None:
        keep &= rows["rank"].isna() | rows["rank"].isin(list(ranks))
    return rows[keep].reset_index(drop=True)


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The `ok` rows, after checking that no table cell would mix two configurations as if they were seeds."""
    ok = rows[rows.status == "ok"].reset_index(drop=True)
    duplicated = ok[ok.duplicated(["group", "task", "seed"], keep=False)]
    if not duplicated.empty:
        first = duplicated.groupby(["group", "task", "seed"], sort=True).head(2).head(2)
        differs = config_differences(first.config_json.tolist())
        raise ReportError(
            f"{len(duplicated)} ok rows share variant, rank, impl, task and seed but differ in "
            f"{', '.join(differs) or 'their run_key only'} (e.g. runs {', '.join(first.run_key)}): a table cell "
            "would mix two configurations as if they were seeds. Report them separately (one results folder "
            "each), or filter the rows first (report.select, or pandas on report.load(...)).")
    return ok


def config_differences(configs: Sequence[str]) -> list[str]:
    """Dotted keys whose values differ between the given config_json strings (paths and devices ignored)."""
    flat = [flatten(results_io.semantic_config(OmegaConf.create(json.loads(c)))) for c in configs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows that are not `ok`, one line each, with the first line of the error."""
    failed = rows[rows.status != "ok"]
    return pd.DataFrame({
        "run_key": failed.run_key, "status": failed.status, "task": failed.task, "variant": failed.variant,
        "rank": failed["rank"], "impl": failed.impl, "seed": failed.seed,
        "error": [first_line(e) for e in failed.error],
    }).reset_index(drop=True)


def first_line(text, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if isinstance(text, str) and text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---- table columns -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One metric column of the results table and where its value comes from."""

    task: str
    metric: str        # the row column is metric_<metric> (best epoch)
    label: str
    split: str | None  # the eval split whose predictions give this metric (MNLI-mm: validation_mismatched)
    base_metric: str   # the name harness.metrics computes (accuracy_mm -> accuracy)
    scale: float       # GLUE metrics are fractions, shown x100 as in the papers; SQuAD's are already 0..100
    primary: bool


def task_config(rows: pd.DataFrame, task: str) -> dict:
    return json.loads(rows[rows.task == task].config_json.iloc[0]).get("task", {})


def metric_split(cfg: dict, metric: str) -> tuple[str | None, str]:
    """(split, metric name without the split suffix): metrics of the first eval split are unsuffixed."""
    splits = list(cfg.get("eval_splits") or [])
    tags = dict(cfg.get("split_tags") or {})
    for split in splits[1:]:
        tag = tags.get(split, split)
        if metric.endswith(f"_{tag}"):
            return split, metric[: -len(tag) - 1]
    return (splits[0] if splits else None), metric


def table_columns(ok: pd.DataFrame, extra_metrics: bool = False) -> list[Column]:
    """The metric columns for the tasks in `ok`: the primary metric first, then its companions (MNLI-mm, EM)."""
    known = [t for t in TASK_ORDER if t in set(ok.task)]
    tasks = known + sorted(set(ok.task) - set(known))
    columns = []
    for task in tasks:
        of_task = ok[ok.task == task]
        primaries = sorted(set(of_task.primary_metric.dropna()))
        if len(primaries) != 1:
            raise ReportError(f"task {task}: rows disagree on the primary metric ({primaries}); report them separately")
        cfg = task_config(ok, task)
        scale = 100.0 if of_task.kind.iloc[0] == "glue" else 1.0
        names = [primaries[0], *COMPANIONS.get(task, ()), *(EXTRAS.get(task, ()) if extra_metrics else ())]
        for name in dict.fromkeys(names):
            if f"metric_{name}" not in ok or of_task[f"metric_{name}"].isna().all():
                continue
            split, base = metric_split(cfg, name)
            columns.append(Column(task, name, column_label(task, name, name == primaries[0]), split, base, scale,
                                  name == primaries[0]))
    return columns


# ---- the paired bootstrap ----------------------------------------------------------------------------
def resampled_metric(metric: str, weights: np.ndarray, draws: np.ndarray, arrays: Mapping[str, np.ndarray]
                     ) -> np.ndarray:
    """`metric` on every resample at once. `weights[b, i]` is how often example i is in resample b.

    MCC, F1, Pearson and Spearman are not means of per-example scores, so they are recomputed from resampled
    sufficient statistics (confusion counts, moments, ranks) with the formulas scikit-learn and SciPy use;
    tests check them against harness.metrics. A per-example column named like the metric (SQuAD exact/F1) is
    averaged, since those metrics are means. Anything else falls back to harness.metrics on each resample
    (`draws`).
    """
    n = weights.shape[1]
    if metric in arrays:
        return weights @ arrays[metric].astype(np.float64) / n
    label, prediction = arrays["label"], arrays["prediction"]
    if metric == "accuracy":
        return weights @ (prediction == label).astype(np.float64) / n
    if metric == "f1":  # binary, positive class 1, 0 when undefined (scikit-learn's zero_division default)
        tp = weights @ ((prediction == 1) & (label == 1)).astype(np.float64)
        fp = weights @ ((prediction == 1) & (label != 1)).astype(np.float64)
        fn = weights @ ((prediction != 1) & (label == 1)).astype(np.float64)
        denominator = 2 * tp + fp + fn
        return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    if metric == "mcc":  # scikit-learn's multiclass formula from the confusion marginals
        classes = np.union1d(label, prediction)
        t = weights @ (label[:, None] == classes).astype(np.float64)
        p = weights @ (prediction[:, None] == classes).astype(np.float64)
        correct = weights @ (prediction == label).astype(np.float64)
        s = weights.sum(axis=1)
        cov_tp = correct * s - (t * p).sum(axis=1)
        cov_pp = s * s - (p * p).sum(axis=1)
        cov_tt = s * s - (t * t).sum(axis=1)
        denominator = cov_tt * cov_pp
        return np.divide(cov_tp, np.sqrt(np.maximum(denominator, 0)), out=np.zeros_like(cov_tp),
                         where=denominator > 0)
    if metric == "pearson":
        return weighted_pearson(weights, prediction.astype(np.float64), label.astype(np.float64))
    if metric == "spearman":  # Pearson of the resample's average ranks (ties included), as SciPy computes it
        return weighted_pearson(weights, weighted_ranks(prediction, weights), weighted_ranks(label, weights))
    return np.array([glue_metrics([metric], prediction[d], label[d])[metric] for d in draws])


def weighted_pearson(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of every resample; x and y are per example (n,) or per resample and example (b, n).

    NaN where a resample is constant, as SciPy returns.
    """
    n = weights.shape[1]

    def mean(values: np.ndarray) -> np.ndarray:
        return weights @ values / n if values.ndim == 1 else (weights * values).sum(axis=1) / n

    x = x - x.mean(axis=-1, keepdims=True)  # centred first: the moments below then lose no precision
    y = y - y.mean(axis=-1, keepdims=True)
    mx, my = mean(x), mean(y)
    vx, vy = mean(x * x) - mx * mx, mean(y * y) - my * my
    cov = mean(x * y) - mx * my
    tiny = 1e-12 * max(float((x * x).mean()), float((y * y).mean()), 1e-300)
    valid = (vx > tiny) & (vy > tiny)
    r = np.full(len(cov), np.nan)
    r[valid] = np.clip(cov[valid] / np.sqrt(vx[valid] * vy[valid]), -1.0, 1.0)
    return r


def weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(b, n): each example's average rank within resample b, where example i occurs weights[b, i] times."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]
    counts = np.add.reduceat(weights[:, order], np.flatnonzero(new_value), axis=1)  # per distinct value
    below = np.cumsum(counts, axis=1) - counts
    ranks = np.empty(weights.shape)
    ranks[:, order] = (below + (counts + 1) / 2)[:, np.cumsum(new_value) - 1]
    return ranks


def pairing_key(frames: Iterable[pd.DataFrame]) -> list[str]:
    """SQuAD predictions pair by question id; GLUE ones by (split, idx)."""
    frames = list(frames)
    if all("id" in f for f in frames):
        return ["id"]
    if all("split" in f for f in frames):
        return ["split", "idx"]
    return ["idx"]


def aligned(frames: Sequence[pd.DataFrame], key: list[str]) -> tuple[list[pd.DataFrame], int]:
    """Every frame restricted to the examples all of them scored, in one sorted order; and the union's size."""
    indexed = []
    for frame in frames:
        frame = frame.set_index(key)
        if frame.index.has_duplicates:
            raise ReportError(f"predictions have duplicate {'/'.join(key)} entries; pass one checkpoint "
                              "(the `best` predictions) and one split per frame")
        indexed.append(frame)
    common = indexed[0].index
    union = indexed[0].index
    for frame in indexed[1:]:
        common = common.intersection(frame.index)
        union = union.union(frame.index)
    common = common.sort_values()
    return [frame.loc[common].reset_index() for frame in indexed], len(union)


def paired_bootstrap(groups: Mapping[str, Sequence[pd.DataFrame]], metric: str, reference: str | None = None,
                     resamples: int = RESAMPLES, seed: int | Sequence[int] = SEED, level: float = LEVEL
                     ) -> pd.DataFrame:
    """Which variants a paired bootstrap over evaluation examples cannot tell from the reference.

    `groups` maps a variant (a table row) to its per-seed prediction frames (columns label and prediction,
    or per-example metric columns for SQuAD; paired by split+idx or id). Each resample draws examples with
    replacement, once for all variants and seeds (that is the pairing); a variant's score on a resample is
    the median over its seeds, as in the table. A variant is `tied` with the reference when the `level`
    percentile interval of (reference - variant) contains 0. The reference defaults to the variant with the
    highest observed score.

    Returns one row per group: observed score on the common examples, the interval of the difference,
    `p_at_least_as_good` (share of resamples where the variant scores >= the reference), `tied`, and the
    number of examples used out of those scored by any seed.
    """
    names = list(groups)
    frames = [frame for name in names for frame in groups[name]]
    if not frames:
        raise ReportError("paired_bootstrap: no prediction frames given")
    if any(len(groups[name]) == 0 for name in names):
        raise ReportError(f"paired_bootstrap: no predictions for {[n for n in names if not groups[n]]}")
    key = pairing_key(frames)
    frames, union = aligned(frames, key)
    n = len(frames[0])
    if n == 0:
        raise ReportError("the prediction frames share no example (paired by " + "/".join(key) + "); they must "
                          "score the same evaluation set, e.g. data.max_eval_samples draws a subset per seed")
    columns = [c for c in ("label", "prediction", metric) if c in frames[0]]
    arrays = [{c: frame[c].to_numpy() for c in columns} for frame in frames]
    owners = np.repeat(np.arange(len(names)), [len(groups[name]) for name in names])

    def scores(weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
        per_seed = np.stack([resampled_metric(metric, weights, draws, a) for a in arrays])  # (seeds, b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: an undefined correlation stays NaN
            return np.stack([np.nanmedian(per_seed[owners == g], axis=0) for g in range(len(names))], axis=1)

    observed = scores(np.ones((1, n)), np.arange(n)[None])[0]
    if reference is None:
        reference = names[int(np.nanargmax(observed))] if not np.isnan(observed).all() else names[0]
    ref = names.index(reference)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // n))
    parts = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        draws = rng.integers(0, n, size=(b, n))
        weights = np.bincount((draws + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        parts.append(scores(weights.astype(np.float64), draws))
    boot = np.concatenate(parts)  # (resamples, groups)
    diff = boot[:, [ref]] - boot
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(diff, [tail, 100 - tail], axis=0)
    valid = ~np.isnan(diff)
    share = np.where(valid.any(axis=0), ((diff <= 0) & valid).sum(axis=0) / np.maximum(valid.sum(axis=0), 1),
                     np.nan)
    return pd.DataFrame({
        "group": names, "observed": observed, "diff_low": low, "diff_high": high,
        "p_at_least_as_good": share,
        "tied": pd.array([None if np.isnan(lo) else bool(lo <= 0 <= hi) for lo, hi in zip(low, high)],
                         dtype="boolean"),
        "examples": n, "examples_any_seed": union, "reference": reference,
    }).set_index("group")


def read_predictions(artifacts: str | Path, checkpoint: str = "best", split: str | None = None) -> pd.DataFrame | None:
    """A run's saved validation predictions at `checkpoint`, of one `split` (None: all); None if not saved."""
    path = Path(artifacts) / "predictions.parquet"
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    if "checkpoint" in frame:
        frame = frame[frame.checkpoint == checkpoint]
    if split is not None and "split" in frame:
        frame = frame[frame.split == split]
    return frame.drop(columns=["checkpoint"], errors="ignore").reset_index(drop=True)


# ---- the results table -------------------------------------------------------------------------------
@dataclass
class PaperTable:
    """The numbers behind table.md/tex/csv. `cells`: one row per (group, column) with the seed statistics,
    `best` (bold), `tied` (not distinguishable from the best); `groups`: the table's rows in order."""

    columns: list[Column]
    groups: pd.DataFrame
    cells: pd.DataFrame
    failures: pd.DataFrame
    max_seeds: int
    head_note: str
    protocols: list[str]
    untested: list[str]
    resamples: int
    level: float
    seed: int
    selection: str = "eval_best"
    degenerate_runs: int = 0  # ok runs whose predictions at the table's checkpoint are constant
    budgets: list[str] = field(default_factory=list)  # tasks whose rows trained on different budgets

    def cell(self, group: str, label: str) -> pd.Series | None:
        hit = self.cells[(self.cells.group == group) & (self.cells.column == label)]
        return None if hit.empty else hit.iloc[0]


def paper_table(rows: pd.DataFrame, extra_metrics: bool = False, resamples: int = RESAMPLES, seed: int = SEED,
                level: float = LEVEL) -> PaperTable:
    """The LoRA paper's Table 2 for `rows` (from `load`/`select`): statistics per variant x metric column.

    Each cell is the median over seeds (± sample standard deviation) of the metric at the run's best
    evaluation (the one with the highest primary metric, the papers' protocol). The average is over the
    tasks' primary columns, for rows that have all of them. Best per column (within a model) is bold; the
    paired bootstrap (`paired_bootstrap`, over the `best` checkpoint predictions, all seeds) marks which
    other rows are statistically tied with it.
    """
    ok = ok_rows(rows)
    if ok.empty:
        fails = failures(rows)
        raise ReportError(f"no ok rows among {len(rows)}: nothing to tabulate. First errors: "
                          + "; ".join(f"{r.task}/{r.variant}: {r.error}" for r in fails.head(3).itertuples()))
    columns = table_columns(ok, extra_metrics)
    groups = group_frame(ok)
    cells = []
    for column in columns:
        of_task = ok[ok.task == column.task]
        for group, part in of_task.groupby("group", sort=False):
            values = (part[f"metric_{column.metric}"] * column.scale).dropna()
            cells.append({"group": group, "column": column.label, "task": column.task, "metric": column.metric,
                          "primary": column.primary, "n_seeds": len(values),
                          "median": values.median() if len(values) else np.nan,
                          "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                          "min": values.min() if len(values) else np.nan,
                          "max": values.max() if len(values) else np.nan,
                          "seeds": ";".join(f"{int(s)}:{v:.6f}" for s, v in zip(part.seed[values.index], values)),
                          "holdout": bool(part.holdout.any()),
                          "degenerate": int((part.degenerate == True).sum()) if "degenerate" in part else 0})  # noqa: E712
    cells = pd.DataFrame(cells)
    # Float noise (an MCC of -1e-17) must neither pick the bold cell nor print as -0.0.
    cells[["median", "std", "min", "max"]] = cells[["median", "std", "min", "max"]].round(9) + 0.0
    # A column where every run of every row is degenerate measures nothing: greyed out, left out of the average.
    cells["dead"] = cells.groupby("column")[["degenerate", "n_seeds"]].transform("sum").pipe(
        lambda sums: sums.degenerate.ge(sums.n_seeds) & sums.n_seeds.gt(0))
    cells = pd.concat([cells, average_cells(cells, groups)], ignore_index=True)
    cells = cells.merge(groups[["group", "model"]], on="group")
    cells["best"] = cells.groupby(["model", "column"])["median"].transform("max").eq(cells["median"])
    cells, untested = mark_ties(cells, ok, columns, resamples, seed, level)
    order = {g: i for i, g in enumerate(groups.group)}
    labels = [c.label for c in columns] + ["Avg."]
    cells = cells.sort_values(["group", "column"], key=lambda s: s.map(order) if s.name == "group"
                              else s.map({label: i for i, label in enumerate(labels)})).reset_index(drop=True)
    protocols = sorted(set(ok.protocol[ok.holdout].dropna()))
    selection = str(ok.checkpoint.iloc[0]) if "checkpoint" in ok else "best"
    selection = {checkpoint: name for name, (checkpoint, _) in SELECTIONS.items()}.get(selection, "eval_best")
    degenerate = int((ok.degenerate == True).sum()) if "degenerate" in ok else 0  # noqa: E712
    return PaperTable(columns, groups, cells, failures(rows), int(cells.n_seeds.max()), head_note(ok), protocols,
                      untested, resamples, level, seed, selection, degenerate, budget_warnings(ok))


def group_frame(ok: pd.DataFrame) -> pd.DataFrame:
    """The table's rows in order, with the trainable parameters without the head (one value, or a range)."""
    first = ok.drop_duplicates("group")
    params = ok.groupby("group").trainable_params_no_head.agg(["min", "max"])
    frame = pd.DataFrame({"group": first.group, "model": first.model, "variant": first.variant,
                          "rank": first["rank"], "impl": first.impl}).reset_index(drop=True)
    frame["params_min"] = frame.group.map(params["min"]).astype("int64")
    frame["params_max"] = frame.group.map(params["max"]).astype("int64")
    return frame


def average_cells(cells: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Avg.: the mean of a row's primary-metric medians, only for rows that have every task of the table."""
    primary = cells[cells.primary & ~cells.get("dead", False)]
    tasks = set(primary.task)
    out = []
    for group in groups.group:
        mine = primary[primary.group == group].dropna(subset=["median"])
        complete = set(mine.task) == tasks
        out.append({"group": group, "column": "Avg.", "task": "", "metric": "average", "primary": False,
                    "n_seeds": int(mine.n_seeds.min()) if len(mine) else 0,
                    "median": float(mine["median"].mean()) if complete else np.nan, "std": np.nan,
                    "min": np.nan, "max": np.nan, "seeds": "", "holdout": bool(mine.holdout.any()),
                    "degenerate": 0, "dead": False})
    return pd.DataFrame(out)


def mark_ties(cells: pd.DataFrame, ok: pd.DataFrame, columns: list[Column], resamples: int, seed: int,
              level: float) -> tuple[pd.DataFrame, list[str]]:
    """Run the paired bootstrap per model x column against the column's best; fill tied/interval columns."""
    cells = cells.assign(tied=pd.array([pd.NA] * len(cells), dtype="boolean"), diff_low=np.nan,
                         diff_high=np.nan, p_at_least_as_good=np.nan, examples=pd.array([pd.NA] * len(cells),
                                                                                       dtype="Int64"))
    untested = []
    cache: dict[tuple[str, str | None], pd.DataFrame | None] = {}

    checkpoint = str(ok.checkpoint.iloc[0]) if "checkpoint" in ok and len(ok) else "best"  # --selection

    def predictions(artifacts: str, split: str | None):
        if (artifacts, split) not in cache:
            cache[(artifacts, split)] = read_predictions(artifacts, checkpoint, split)
        return cache[(artifacts, split)]

    for column in columns:
        for model in sorted(set(ok.model)):
            mine = cells[(cells.column == column.label) & (cells.model == model)].dropna(subset=["median"])
            if mine.empty:
                continue
            reference = mine[mine.best].group.iloc[0]
            frames, missing = {}, []
            for group in mine.group:
                runs = ok[(ok.group == group) & (ok.task == column.task)]
                found = [predictions(a, column.split) for a in runs.artifacts]
                if any(f is None or f.empty for f in found):
                    missing.append(group)
                else:
                    frames[group] = found
            if reference not in frames:
                untested.append(f"{column.label}: the best row has no saved predictions, nothing tested")
                continue
            if missing:
                untested.append(f"{column.label}: no saved predictions for {', '.join(sorted(missing))}")
            stream = zlib.crc32(f"{model}/{column.label}".encode())  # one stream per column: stable under additions
            try:
                test = paired_bootstrap(frames, column.base_metric, reference, resamples, [seed, stream], level)
            except ReportError as err:  # e.g. data.max_eval_samples drew a different subset for every seed
                untested.append(f"{column.label}: not tested, {err}")
                continue
            if int(test.examples.iloc[0]) < int(test.examples_any_seed.iloc[0]):
                untested.append(f"{column.label}: the seeds scored different example sets; the test used the "
                                f"{int(test.examples.iloc[0])} of {int(test.examples_any_seed.iloc[0])} they share")
            rows = (cells.column == column.label) & cells.group.isin(test.index)
            for name in ("tied", "diff_low", "diff_high", "p_at_least_as_good", "examples"):
                cells.loc[rows, name] = cells.loc[rows, "group"].map(test[name]).to_numpy()
            cells.loc[rows, ["diff_low", "diff_high"]] *= BOOTSTRAP_SCALE
            # 4 decimals: a last-bit difference in a BLAS sum must not make --check fail on another machine
            cells.loc[rows, ["diff_low", "diff_high", "p_at_least_as_good"]] = (
                cells.loc[rows, ["diff_low", "diff_high", "p_at_least_as_good"]].astype(float).round(4) + 0.0)
    return cells, untested


def head_note(ok: pd.DataFrame) -> str:
    """The head's size, stated once: every variant trains it, so the parameter column leaves it out."""
    sizes = ok.groupby(["model", "head_params"]).task.agg(lambda t: sorted(set(t), key=task_position))
    parts = []
    for (model, size), tasks in sizes.items():
        parts.append(f"{int(size):,} for {model} on {', '.join(TASK_LABELS.get(t, t) for t in tasks)}")
    return ("Trainable parameters exclude the task head (classifier, or QA outputs; for BERT-family encoders "
            "also the pooler), which every variant trains: " + "; ".join(parts) + ".")


def task_position(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)


# ---- formatting --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One table cell, rendered to Markdown or LaTeX: a number (or label) with its marks."""

    text: str
    std: str = ""
    bold: bool = False
    underline: bool = False
    dagger: bool = False
    note: str = ""
    degenerate: bool = False  # ° : some run of the cell predicts a constant
    grey: bool = False  # a column where every run is degenerate


@dataclass
class Grid:
    """A rendered-format-neutral table: caption, header, body, footnotes."""

    caption: str
    header: list[Cell]
    body: list[list[Cell]]
    align: str
    notes: list[str] = field(default_factory=list)
    label: str = ""
    after: list[str] = field(default_factory=list)  # Markdown-only lines after the notes (failure list)


def format_count(n: float) -> str:
    """Parameters the way papers print them: 0.29M, 73.7K, 512."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"


def fixed(value: float, decimals: int = 1) -> str:
    """One decimal as in the papers' tables, and never "-0.0"."""
    text = f"{value:.{decimals}f}"
    return text[1:] if re.fullmatch(r"-0\.0*", text) else text


def format_sig(value: float, digits: int = 3) -> str:
    """`digits` significant digits, never in scientific notation (123, 12.3, 1.23, 0.123)."""
    if value is None or pd.isna(value):
        return "–"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def byte_unit(values: Iterable[float]) -> tuple[str, int]:
    """The largest unit in which the column's largest value is at least 1."""
    top = max((v for v in values if pd.notna(v)), default=0)
    return next(((name, size) for name, size in BYTE_UNITS if top >= size), BYTE_UNITS[-1])


def markdown(grid: Grid) -> str:
    def render(cell: Cell) -> str:
        text = cell.text.replace("|", "\\|")
        if cell.underline:
            text = f"<ins>{text}</ins>"
        if cell.bold:
            text = f"**{text}**"
        text += f" ± {cell.std}" if cell.std else ""
        text += "†" if cell.dagger else ""
        text += "°" if cell.degenerate else ""
        text += f" ({cell.note})" if cell.note else ""
        return f'<span style="color:gray">{text}</span>' if cell.grey else text

    aligns = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [f"**Table.** {grid.caption}", ""] if grid.caption else []
    lines.append("| " + " | ".join(render(c) for c in grid.header) + " |")
    lines.append("|" + "|".join(aligns[a] for a in grid.align) + "|")
    lines += ["| " + " | ".join(render(c) for c in row) + " |" for row in grid.body]
    if grid.notes:
        lines += [""] + [f"{note}  " for note in grid.notes]
    if grid.after:
        lines += [""] + grid.after
    return "\n".join(lines).rstrip() + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "†": r"$^\dagger$", "–": "--", "—": "---", "≥": r"$\geq$", "≤": r"$\leq$",
                 "×": r"$\times$", "−": "-", "…": r"\ldots{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def latex(grid: Grid) -> str:
    """A booktabs table (\\toprule/\\midrule/\\bottomrule); needs \\usepackage{booktabs}."""

    def render(cell: Cell) -> str:
        text = latex_escape(cell.text)
        if cell.underline:
            text = rf"\underline{{{text}}}"
        if cell.bold:
            text = rf"\textbf{{{text}}}"
        text += rf"$_{{\pm {cell.std}}}$" if cell.std else ""
        text += r"$^\dagger$" if cell.dagger else ""
        text += r"$^\circ$" if cell.degenerate else ""
        text += rf"\textsuperscript{{{latex_escape(cell.note)}}}" if cell.note else ""
        return rf"\textcolor{{gray}}{{{text}}}" if cell.grey else text

    lines = [r"% generated by python -m harness.report; needs \usepackage{booktabs}", r"\begin{table}[t]",
             r"\centering", r"\small", rf"\begin{{tabular}}{{{grid.align}}}", r"\toprule",
             " & ".join(render(c) for c in grid.header) + r" \\", r"\midrule"]
    lines += [" & ".join(render(c) for c in row) + r" \\" for row in grid.body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if grid.notes:
        lines += [r"\par\smallskip\footnotesize"] + [latex_escape(note) + r"\par" for note in grid.notes]
    lines += [rf"\caption{{{latex_escape(grid.caption)}}}"] if grid.caption else []
    lines += [rf"\label{{{grid.label}}}"] if grid.label else []
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def csv_text(frame: pd.DataFrame) -> str:
    """CSV with fixed float formatting and line endings, so regenerating it gives the same bytes."""
    return frame.to_csv(index=False, float_format="%.6f", lineterminator="\n")


def row_label_cells(groups: pd.DataFrame, row) -> list[Cell]:
    """Model (when several), method, rank, impl (when peft rows exist)."""
    cells = [Cell(str(row.model))] if groups.model.nunique() > 1 else []
    cells += [Cell(variant_label(row.variant)), Cell("–" if pd.isna(row["rank"]) else str(int(row["rank"])))]
    cells += [Cell(str(row.impl))] if set(groups.impl) != {"ours"} else []
    return cells


def row_label_header(groups: pd.DataFrame) -> list[Cell]:
    cells = [Cell("Model")] if groups.model.nunique() > 1 else []
    cells += [Cell("Method"), Cell("r")]
    return cells + ([Cell("impl")] if set(groups.impl) != {"ours"} else [])


def results_grid(table: PaperTable) -> Grid:
    """The paper-style table as a Grid (see `markdown` / `latex`)."""
    labels = [c.label for c in table.columns] + ["Avg."]
    holdout_columns = {label for label in labels
                       if (mine := table.cells[(table.cells.column == label) & table.cells["median"].notna()]).size
                       and mine.holdout.all()}
    header = row_label_header(table.groups) + [Cell("# Trainable params")]
    header += [Cell(label, dagger=label in holdout_columns) for label in labels]
    body = []
    for row in table.groups.itertuples(index=False):
        row = pd.Series(row._asdict())
        params = (format_count(row.params_min) if row.params_min == row.params_max
                  else f"{format_count(row.params_min)}–{format_count(row.params_max)}")
        line = row_label_cells(table.groups, row) + [Cell(params)]
        for label in labels:
            cell = table.cell(row.group, label)
            if cell is None or pd.isna(cell["median"]):
                line.append(Cell("–"))
                continue
            note = f"n={int(cell.n_seeds)}" if label != "Avg." and cell.n_seeds < table.max_seeds else ""
            line.append(Cell(fixed(cell["median"]), std="" if pd.isna(cell["std"]) else fixed(cell["std"]),
                             bold=bool(cell.best), underline=bool(pd.notna(cell.tied) and cell.tied and not cell.best),
                             dagger=bool(cell.holdout) and label not in holdout_columns, note=note,
                             degenerate=bool(cell.get("degenerate", 0)), grey=bool(cell.get("dead", False))))
        body.append(line)
    models = sorted(set(table.groups.model))
    metrics = "; ".join(f"{TASK_LABELS.get(t, t)} {describe_metrics(table.columns, t)}"
                        for t in dict.fromkeys(c.task for c in table.columns))
    caption = (
        f"Results of {', '.join(models)} on the validation sets: each cell is the median over seeds ± the sample "
        f"standard deviation ({table.max_seeds} seed{'s' if table.max_seeds != 1 else ''} unless n= says fewer). "
        f"{SELECTION_CAPTIONS[table.selection]}. "
        f"Metrics: {metrics}; GLUE scores x100. Avg. is the mean of the tasks' first (primary) columns, "
        "for rows with every task. Bold: best in the column. Underlined: not significantly different from the "
        f"bold one — paired bootstrap over validation examples ({table.resamples} resamples, seed {table.seed}, "
        f"all seeds, each resample scored as the median over seeds): the {table.level:.0%} percentile interval of "
        "(best − row) contains 0. Avg. is not tested.")
    notes = [table.head_note]
    dead = sorted(set(table.cells.column[table.cells.get("dead", False) == True]))  # noqa: E712
    notes.append(f"° {table.degenerate_runs} run(s) predict a constant on the evaluation split (one class, or zero "
                 "variance): a degenerate run, scored at the majority class (MCC 0, correlation undefined); ° marks "
                 "the cells that hold one." + (f" Greyed out and left out of Avg.: {', '.join(dead)}, where every "
                                              "run is degenerate." if dead else ""))
    notes += [f"Warning: {line}." for line in table.budgets]
    if table.protocols:
        notes.append("† Non-standard protocol (data.protocol=holdout), not comparable with published dev-set scores: "
                     + " | ".join(table.protocols))
    notes += [f"Bootstrap: {u}." for u in table.untested]
    after = []
    if len(table.failures):
        after = [f"**Not in the table: {len(table.failures)} run(s) that did not finish ok.**", "",
                 "| run_key | status | task | variant | r | seed | error |", "|---|---|---|---|---|---|---|"]
        after += [f"| {f.run_key} | {f.status} | {f.task} | {f.variant} | {'–' if pd.isna(f.rank) else int(f.rank)}"
                  f" | {'–' if pd.isna(f.seed) else int(f.seed)} | {str(f.error).replace('|', '/')} |"
                  for f in table.failures.itertuples()]
        notes.append(f"{len(table.failures)} run(s) did not finish ok and are not in the table (listed in table.md).")
    align = "l" * len(row_label_header(table.groups)) + "r" * (1 + len(labels))
    return Grid(caption, header, body, align, notes, "tab:results", after)


def describe_metrics(columns: list[Column], task: str) -> str:
    names = [METRIC_LABELS.get(c.base_metric, c.base_metric) for c in columns if c.task == task]
    if task == "mnli" and len(names) == 2:
        return "accuracy (matched/mismatched)"
    return "/".join(dict.fromkeys(names))


def results_csv(table: PaperTable) -> pd.DataFrame:
    cols = ["model", "variant", "rank", "impl", "params_no_head"]
    groups = table.groups.assign(params_no_head=table.groups.params_min)
    out = table.cells.drop(columns=["model"]).merge(groups[["group", *cols]], on="group")
    keep = cols + ["column", "task", "metric", "n_seeds", "median", "std", "min", "max", "holdout", "best", "tied",
                   "diff_low", "diff_high", "p_at_least_as_good", "examples", "seeds"]
    return out[keep]


# ---- efficiency --------------------------------------------------------------------------------------
EFFICIENCY_BYTES = ("peak_memory_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes",
                    "saved_activation_bytes", "account_bytes", "adapter_bytes")


def efficiency_frame(rows: pd.DataFrame, task: str | None = None) -> pd.DataFrame:
    """Per variant x rank (x impl): the median over seeds per task, then the median over the tasks that every
    row of the table has (or of one `task`). Speed differs by task several-fold, so a row measured on more
    of the slow tasks must not look slower for it.

    Peak memory is what was measured: CUDA max allocated where the run had a GPU, else the process's peak
    RSS (which includes the Python process, its data and the frozen base model; reset per run on Linux). The
    account is exact: parameter, gradient and optimizer-state bytes after the first step, plus the bytes
    autograd saved for backward in the first step.
    """
    ok = ok_rows(rows)
    if task is not None:
        ok = ok[ok.task == task]
    if ok.empty:
        raise ReportError(f"no ok rows{' for task ' + task if task else ''} to measure")
    ok = ok.assign(
        peak_memory_bytes=ok.cuda_peak_allocated_bytes.fillna(ok.cpu_peak_rss_bytes),
        peak_memory_kind=np.where(ok.cuda_peak_allocated_bytes.notna(), "CUDA allocated", "CPU RSS"),
        account_bytes=ok[["param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes"]]
        .sum(axis=1, min_count=4))
    measures = ["train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s", *EFFICIENCY_BYTES]
    common = set.intersection(*ok.groupby("group").task.agg(set))
    used = ok[ok.task.isin(common)] if common else ok  # no task in common: each row over its own tasks
    per_task = used.groupby(["group", "task"], sort=False)[measures].median().reset_index()
    stats = per_task.groupby("group", sort=False)[measures].median()
    first = ok.drop_duplicates("group").set_index("group")
    frame = first[["model", "variant", "rank", "impl"]].join(stats)
    frame.insert(4, "runs", used.groupby("group", sort=False).size())
    frame.insert(5, "tasks", used.groupby("group", sort=False).task.agg(
        lambda t: ",".join(sorted(set(t), key=task_position))))
    frame["peak_memory_kind"] = ok.groupby("group", sort=False).peak_memory_kind.agg(lambda k: "/".join(sorted(set(k))))
    frame["device"] = ok.groupby("group", sort=False).device.agg(
        lambda d: "/".join(sorted(set(str(x).split("@")[0] for x in d.dropna()))))
    return frame.reset_index()


def efficiency_grid(frame: pd.DataFrame, task: str | None = None) -> Grid:
    units = {name: byte_unit(frame[name]) for name in EFFICIENCY_BYTES}
    kinds = sorted(set("/".join(sorted(set(frame.peak_memory_kind))).split("/")))
    titles = {"peak_memory_bytes": f"Peak memory ({'/'.join(kinds)})", "param_bytes": "Params",
              "grad_bytes": "Grads", "optimizer_state_bytes": "Optimizer", "saved_activation_bytes": "Activations",
              "account_bytes": "Account total", "adapter_bytes": "Adapter file"}
    header = row_label_header(frame) + [Cell("Runs"), Cell("Train samples/s"), Cell("Train tokens/s"),
                                        Cell("Eval samples/s")]
    header += [Cell(f"{titles[name]} [{units[name][0]}]") for name in EFFICIENCY_BYTES]
    body = []
    for row in frame.itertuples(index=False):
        row = pd.Series(row._asdict())
        line = row_label_cells(frame, row) + [Cell(str(int(row.runs)))]
        line += [Cell(format_sig(row[name])) for name in ("train_samples_per_s", "train_tokens_per_s",
                                                           "eval_samples_per_s")]
        line += [Cell(format_sig(row[name] / units[name][1]) if pd.notna(row[name]) else "–")
                 for name in EFFICIENCY_BYTES]
        body.append(line)
    devices = sorted(set("/".join(frame.device).split("/")) - {""})
    used = sorted(set(",".join(frame.tasks).split(",")) - {""}, key=task_position)
    tasks_text = ", ".join(TASK_LABELS.get(t, t) for t in used)
    scope = (f"on {TASK_LABELS.get(task, task)}" if task else
             f"the median over seeds per task, then over the tasks every row has: {tasks_text}"
             if frame.tasks.nunique() == 1 else
             f"the median over seeds per task, then over the row's own tasks, as no task is common to all: "
             f"{tasks_text}")
    caption = (f"Efficiency per variant and rank: medians of each row's ok runs ({scope}; device: "
               f"{', '.join(devices) or 'unknown'}). Throughput excludes evaluation; tokens are non-padding "
               "tokens. Peak memory is measured (CUDA max allocated, or the process's peak RSS on CPU). The exact "
               "account is parameter + gradient + optimizer-state bytes after the first step plus the bytes "
               "autograd saved for backward in the first step (Activations). The adapter file holds the "
               "trained tensors and the task head (safetensors).")
    notes = []
    if "CPU RSS" in kinds:
        notes.append("CPU RSS is the whole process's peak during the run (reset per run on Linux; elsewhere since "
                     "the process started): it includes Python, the data and the frozen base model; compare the "
                     "account columns across variants.")
    align = "l" * len(row_label_header(frame)) + "r" * (len(header) - len(row_label_header(frame)))
    return Grid(caption, header, body, align, notes, "tab:efficiency")


# ---- our parameter counts next to the papers' --------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """A trainable-parameter count printed in a paper, and the overrides that reproduce its setting here."""

    variant: str
    setting: str
    overrides: Mapping[str, tuple[str, ...]]  # model config name -> Hydra overrides of the variant
    counts: Mapping[str, str]                 # model config name -> the count as printed
    source: str
    whole_model: bool = False                 # the paper counts every parameter (full fine-tuning)


QV = "variant.targets=[query,value]"
PUBLISHED = (
    Published("full", "every parameter", {"roberta_base": (), "roberta_large": ()},
              {"roberta_base": "125.0M", "roberta_large": "355.0M"}, "LoRA (Hu et al., 2021), Table 2", True),
    Published("bitfit", "bias terms", {"roberta_base": ()}, {"roberta_base": "0.1M"},
              "LoRA (Hu et al., 2021), Table 2"),
    Published("lora", "r=8 on W_q, W_v", {"roberta_base": ("variant.r=8", QV), "roberta_large": ("variant.r=8", QV)},
              {"roberta_base": "0.3M", "roberta_large": "0.8M"}, "LoRA (Hu et al., 2021), Table 2"),
    Published("vera", "r=1024 (base) / 256 (large) on W_q, W_v",
              {"roberta_base": ("variant.r=1024", QV), "roberta_large": ("variant.r=256", QV)},
              {"roberta_base": "0.043M", "roberta_large": "0.061M"}, "VeRA (Kopiczko et al., 2024), Table 2"),
)
PARAM_MODELS = ("roberta_base", "roberta_large")


def parse_count(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([KMB]?)", text).groups()
    return float(number) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit]


@functools.lru_cache(maxsize=None)
def count_parameters(model: str, variant: str, overrides: tuple[str, ...]) -> dict:
    """Our counts for `variant` on a random-init `model` (no weights downloaded), via harness.inspect.

    Built on the meta device first (shapes only: the counts are the same and roberta-large takes 0.1 s
    instead of 5 s); a variant that cannot be built there (e.g. it draws random tensors with a CPU
    generator) is built for real.
    """
    import torch

    from harness.inspect import compose_config, inspect

    cfg = compose_config([f"model={model}", "model.init=random", "task=rte", f"variant={variant}", *overrides])
    try:
        with torch.device("meta"):
            found = inspect(cfg)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        found = inspect(cfg)
    return {k: found[k] for k in ("trainable_params", "trainable_params_no_head", "head_params", "total_params")}


def param_count_frame(variants: Iterable[str] | None = None) -> pd.DataFrame:
    """Our trainable-parameter counts next to the published ones, for every registered variant with a count.

    Ours are computed now (random-init roberta-base/large, task head for RTE's 2 labels), never copied.
    """
    from harness.adapters import VARIANTS

    wanted = set(VARIANTS) if variants is None else set(variants) & set(VARIANTS)
    out = []
    for entry in PUBLISHED:
        if entry.variant not in wanted:
            continue
        for model in PARAM_MODELS:
            if model not in entry.counts:
                continue
            ours = count_parameters(model, entry.variant, tuple(entry.overrides[model]))
            counted = ours["trainable_params"] if entry.whole_model else ours["trainable_params_no_head"]
            published = parse_count(entry.counts[model])
            out.append({"variant": entry.variant, "setting": entry.setting, "model": model,
                        "counted": "whole model" if entry.whole_model else "without head", "ours": counted,
                        "published": entry.counts[model], "ratio": counted / published,
                        "head_params": ours["head_params"], "source": entry.source,
                        "overrides": " ".join(entry.overrides[model])})
    return pd.DataFrame(out, columns=["variant", "setting", "model", "counted", "ours", "published", "ratio",
                                      "head_params", "source", "overrides"])


def param_count_grid(frame: pd.DataFrame) -> Grid:
    header = [Cell("Method"), Cell("Setting"), Cell("Counted")]
    for model in PARAM_MODELS:
        header += [Cell(f"{model} ours"), Cell(f"{model} paper")]
    header.append(Cell("Source"))
    body = []
    for (variant, setting), part in frame.groupby(["variant", "setting"], sort=False):
        line = [Cell(variant_label(variant)), Cell(setting), Cell(part.counted.iloc[0])]
        for model in PARAM_MODELS:
            hit = part[part.model == model]
            if hit.empty:
                line += [Cell("–"), Cell("–")]
            else:
                ours = int(hit.ours.iloc[0])
                line += [Cell(f"{ours:,} ({format_count(ours)})"), Cell(hit.published.iloc[0])]
        body.append(line + [Cell(part.source.iloc[0])])
    heads = frame.drop_duplicates("model").set_index("model").head_params
    caption = ("Trainable parameters: ours, counted on randomly initialised roberta-base and roberta-large "
               "(model.init=random, no weights; python -m harness.inspect), next to the counts the papers print. "
               "Without head: the papers' convention for adapters; the task head (here "
               + ", ".join(f"{int(v):,} on {k}" for k, v in heads.items())
               + " for 2 labels) is trained by every variant. Full fine-tuning is counted over the whole model.")
    notes = ["Only registered variants with a published roberta-base/large count appear; the overrides that "
             "reproduce each setting are in param_counts.csv."]
    return Grid(caption, header, body, "lll" + "r" * (2 * len(PARAM_MODELS)) + "l", notes, "tab:param-counts")


# ---- histories and DyLoRA's rank scores --------------------------------------------------------------
def histories(rows: pd.DataFrame) -> pd.DataFrame:
    """Every ok run's evaluation history (the model as trained; DyLoRA's per-rank settings left out)."""
    frames = []
    for row in ok_rows(rows).itertuples():
        path = Path(row.artifacts) / "history.parquet"
        if not path.exists():
            continue
        history = pd.read_parquet(path)
        if "setting" in history:
            history = history[history.setting.isna()]
        frames.append(history[["step", "epoch", "train_loss", "score"]].assign(
            group=row.group, task=row.task, seed=row.seed, run_key=row.run_key))
    columns = ["step", "epoch", "train_loss", "score", "group", "task", "seed", "run_key"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def rank_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """DyLoRA's score per evaluated rank as long rows, at the run's best evaluation (the one the table scores),
    from its history; a run without history gives its row's rank_scores_json (those of its last evaluation)."""
    ok = ok_rows(rows)
    ok = ok[ok.rank_scores_json.notna()]
    out = []
    for row in ok.itertuples():
        settings = json.loads(row.rank_scores_json)
        path = Path(row.artifacts) / "history.parquet"
        if path.exists():
            history = pd.read_parquet(path)
            if "setting" in history:
                at_best = history[history.setting.notna() & (history.step == row.best_step)]
                settings = dict(zip(at_best.setting, at_best.score)) or settings
        for label, score in settings.items():
            digits = re.findall(r"\d+", str(label))
            out.append({"group": row.group, "task": row.task, "seed": row.seed, "setting": str(label),
                        "rank": int(digits[-1]) if digits else np.nan, "score": score})
    return pd.DataFrame(out, columns=["group", "task", "seed", "setting", "rank", "score"])


# ---- plots -------------------------------------------------------------------------------------------
PLOT_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
              "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "harness-report", "svg.fonttype": "none"}
MARKERS = "osD^v<>pPX*hd8"
# tab10, then five colours from ColorBrewer's Dark2 that no tab10 colour resembles: 15 distinguishable
# variants (tab20 would pair each colour with a pale copy of itself).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#e7298a", "#a6761d", "#1b9e77", "#7570b3")
LINESTYLES = ("-", "--", ":", "-.")


def styled(plot: Callable) -> Callable:
    """Draw inside the report's matplotlib style (font sizes are fixed when artists are created)."""

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(PLOT_STYLE):
            return plot(*args, **kwargs)

    return draw


def figure(panels: int, columns: int = 3, width: float = 4.2, height: float = 3.4):
    """A Figure (no pyplot: nothing global, no GUI backend needed) with a grid of axes; extra axes hidden."""
    from matplotlib.figure import Figure

    ncols = min(columns, max(panels, 1))
    nrows = math.ceil(max(panels, 1) / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def variant_styles(groups: pd.DataFrame) -> dict[str, dict]:
    """A fixed colour and marker per variant (and impl), in table order, so every plot agrees."""
    names = list(dict.fromkeys(zip(groups.variant, groups.impl)))
    return {key: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}
            for i, key in enumerate(names)}


def rank_linestyle(groups: pd.DataFrame, variant: str, rank) -> str:
    """Solid for a variant's smallest rank, then dashed, dotted, dash-dotted: ranks of one colour stay apart."""
    return "-" if pd.isna(rank) else LINESTYLES[ranks_of(groups, variant).index(rank) % len(LINESTYLES)]


def series_label(variant: str, impl: str, rank=None) -> str:
    text = variant_label(variant) + ("" if impl == "ours" else f" ({impl})")
    return text if rank is None or pd.isna(rank) else f"{text} r={int(rank)}"


def legend_below(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="outside lower center",
                   ncols=min(len(labels), 5), frameon=False)


def score_panels(table: PaperTable) -> list[tuple[str, str, str]]:
    """(column label, panel title, y-axis label) of the primary columns, plus Avg. when any row has it."""
    def title(label: str) -> str:
        cells = table.cells[table.cells.column == label]
        return label + (" (holdout protocol)" if cells.holdout.any() else "")

    panels = [(c.label, title(c.label), METRIC_LABELS.get(c.base_metric, c.base_metric)
               + (" x100" if c.scale == 100 else "")) for c in table.columns if c.primary]
    if table.cells[table.cells.column == "Avg."]["median"].notna().any():
        panels.append(("Avg.", title("Avg."), "mean of the primary metrics"))
    return panels


def finish_axes(ax, title: str, xlabel: str, ylabel: str, min_span: float = 1.0) -> None:
    """Titles and labels; the y range is at least `min_span` wide so flat data is not blown up to noise."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    low, high = ax.get_ylim()
    if high - low < min_span:
        middle = (low + high) / 2
        ax.set_ylim(middle - min_span / 2, middle + min_span / 2)
    ax.ticklabel_format(axis="y", useOffset=False)


@styled
def plot_score_vs_rank(table: PaperTable):
    """Median score (± std over seeds) against rank, one line per rank-using variant, one panel per task;
    rank-free variants are horizontal dashed lines."""
    groups = table.groups
    styles = variant_styles(groups)
    panels = score_panels(table)
    fig, axes = figure(len(panels))
    ranks = sorted(int(r) for r in groups["rank"].dropna().unique())
    for ax, (label, title, ylabel) in zip(axes, panels):
        cells = table.cells[table.cells.column == label].merge(groups.drop(columns="model"), on="group")
        cells = cells.dropna(subset=["median"])
        for (variant, impl), part in cells.groupby(["variant", "impl"], sort=False):
            style = styles[(variant, impl)]
            if part["rank"].isna().all():
                ax.axhline(part["median"].iloc[0], color=style["color"], linestyle="--", linewidth=1.4,
                           label=series_label(variant, impl) + " (no rank)")
                continue
            part = part.dropna(subset=["rank"]).sort_values("rank")
            ax.errorbar(part["rank"].astype(float), part["median"], yerr=part["std"].fillna(0), capsize=3,
                        linewidth=1.6, markersize=6, label=series_label(variant, impl), **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        finish_axes(ax, title, "rank r (log scale)", ylabel)
    fig.suptitle(f"Score vs rank ({', '.join(sorted(set(groups.model)))}; median over seeds, bars: std)")
    legend_below(fig, axes)
    return fig


def pareto_front(params: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats with fewer-or-equal parameters and a higher-or-equal score."""
    order = np.lexsort((-scores, params))
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return np.array(front, dtype=int)


@styled
def plot_score_vs_params(table: PaperTable):
    """Median score against trainable parameters without the head (log x), with the Pareto front per panel.

    Head-only training has no parameters beyond the head, which a log axis cannot place: it is a dotted line,
    and it takes part in the front (a variant scoring no better than it is not on the front).
    """
    groups = table.groups
    styles = variant_styles(groups)
    panels = score_panels(table)
    fig, axes = figure(len(panels))
    for ax, (label, title, ylabel) in zip(axes, panels):
        cells = table.cells[table.cells.column == label].merge(groups.drop(columns="model"), on="group")
        cells = cells.dropna(subset=["median"])
        for (variant, impl), part in cells.groupby(["variant", "impl"], sort=False):
            style = styles[(variant, impl)]
            if (part.params_min == 0).all():
                ax.axhline(part["median"].iloc[0], color=style["color"], linestyle=":", linewidth=1.6,
                           label=series_label(variant, impl) + " (0 params beyond head)")
                continue
            part = part[part.params_min > 0].sort_values("params_min")  # a variant's ranks, joined left to right
            ax.errorbar(part.params_min, part["median"], yerr=part["std"].fillna(0), linewidth=0.8, capsize=3,
                        markersize=7, label=series_label(variant, impl), **style)
        front = cells.iloc[pareto_front(cells.params_min.to_numpy(float), cells["median"].to_numpy(float))]
        front = front[front.params_min > 0]  # head-only is on the front too (its line); a point below it is not
        if len(front):
            ax.step(front.params_min, front["median"], where="post", color="black", linewidth=1, alpha=0.7,
                    label="Pareto front", zorder=0)
        ax.set_xscale("log")
        finish_axes(ax, title, "trainable parameters w/o head (log)", ylabel)
    fig.suptitle(f"Score vs trainable parameters ({', '.join(sorted(set(groups.model)))}; median over seeds)")
    legend_below(fig, axes)
    return fig


@styled
def plot_efficiency(frame: pd.DataFrame):
    """Train and eval throughput, the exact memory account (stacked) and the measured peak, per table row."""
    styles = variant_styles(frame)
    labels = [series_label(v, i, r) for v, i, r in zip(frame.variant, frame.impl, frame["rank"])]
    colors = [styles[(v, i)]["color"] for v, i in zip(frame.variant, frame.impl)]
    y = np.arange(len(frame))
    fig, axes = figure(4, columns=4, width=3.9, height=1.6 + 0.3 * len(frame))
    for ax, name, title in ((axes[0], "train_samples_per_s", "Training throughput"),
                            (axes[1], "eval_samples_per_s", "Evaluation throughput")):
        ax.barh(y, frame[name].fillna(0), color=colors)
        ax.set_title(title)
        ax.set_xlabel("samples / s (median over runs)")
    unit, size = byte_unit(frame.account_bytes)
    left = np.zeros(len(frame))
    parts = (("param_bytes", "parameters", "#4c72b0"), ("grad_bytes", "gradients", "#dd8452"),
             ("optimizer_state_bytes", "optimizer state", "#55a868"),
             ("saved_activation_bytes", "saved activations", "#c44e52"))
    for name, legend, color in parts:
        values = frame[name].fillna(0).to_numpy(float) / size
        axes[2].barh(y, values, left=left, color=color, label=legend)
        left += values
    axes[2].set_title("Memory account (exact)")
    axes[2].set_xlabel(unit)
    fig.legend(*axes[2].get_legend_handles_labels(), loc="outside lower center", ncols=4, frameon=False,
               title="memory account")
    kinds = "/".join(sorted(set(frame.peak_memory_kind)))
    unit, size = byte_unit(frame.peak_memory_bytes)
    axes[3].barh(y, frame.peak_memory_bytes.fillna(0) / size, color=colors)
    axes[3].set_title(f"Measured peak ({kinds})")
    axes[3].set_xlabel(unit)
    for ax in axes:
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(y))
        ax.set_ylim(len(frame) - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
    fig.suptitle(f"Efficiency per variant and rank ({', '.join(sorted(set(frame.model)))}; medians over runs)")
    return fig


@styled
def plot_training_curves(rows: pd.DataFrame, history: pd.DataFrame | None = None, ranks: Iterable[int] | None = None):
    """Validation score and training loss against step, per task; one line per row of the table (median
    over seeds at each evaluation). Rank-using variants are drawn at `ranks` (default: the middle of the
    ranks run, e.g. 8 of 4/8/16): one line per variant stays readable with a dozen variants."""
    history = histories(rows) if history is None else history
    if history.empty:
        raise ReportError("no history.parquet beside the ok rows: nothing to plot")
    groups = group_frame(ok_rows(rows))
    styles = variant_styles(groups)
    run_ranks = sorted(groups["rank"].dropna().unique().tolist())
    ranks = set(run_ranks[(len(run_ranks) - 1) // 2: (len(run_ranks) - 1) // 2 + 1] if ranks is None else ranks)
    shown = groups[groups["rank"].isna() | groups["rank"].isin(ranks)]
    tasks = sorted(set(history.task), key=task_position)
    fig, axes = figure(2 * len(tasks), columns=len(tasks), width=4.2, height=3.0)
    curves = history.groupby(["group", "task", "step"], sort=False)[["score", "train_loss"]].median().reset_index()
    for j, task in enumerate(tasks):
        for row in shown.itertuples():
            part = curves[(curves.group == row.group) & (curves.task == task)].sort_values("step")
            if part.empty:
                continue
            style = dict(styles[(row.variant, row.impl)], linestyle=rank_linestyle(shown, row.variant, row.rank))
            label = series_label(row.variant, row.impl, row.rank)
            axes[j].plot(part.step, part.score * task_scale(rows, task), markersize=4, label=label, **style)
            axes[len(tasks) + j].plot(part.step, part.train_loss, markersize=4, label=label, **style)
        finish_axes(axes[j], f"{TASK_LABELS.get(task, task)}: validation", "optimizer step", primary_of(rows, task))
        finish_axes(axes[len(tasks) + j], f"{TASK_LABELS.get(task, task)}: training", "optimizer step",
                    "training loss (mean since last eval)", min_span=0.01)
    at = f"; rank-using variants at r={', '.join(str(int(r)) for r in sorted(ranks))}" if run_ranks else ""
    fig.suptitle(f"Training curves (median over seeds at each evaluation{at})")
    legend_below(fig, axes)
    return fig


def ranks_of(groups: pd.DataFrame, variant: str) -> list:
    return sorted(groups[groups.variant == variant]["rank"].dropna().unique().tolist())


def task_scale(rows: pd.DataFrame, task: str) -> float:
    """GLUE metrics are fractions and shown x100, as in the table; SQuAD's are 0..100 already."""
    return 100.0 if (rows[rows.task == task].kind == "glue").any() else 1.0


def primary_of(rows: pd.DataFrame, task: str) -> str:
    """The y-axis label of a task's primary metric, on the table's scale."""
    metric = rows[rows.task == task].primary_metric.dropna()
    name = METRIC_LABELS.get(metric.iloc[0], metric.iloc[0]) if len(metric) else "score"
    return name + (" x100" if task_scale(rows, task) == 100 else "")


@styled
def plot_rank_curve(rows: pd.DataFrame, scores: pd.DataFrame | None = None):
    """DyLoRA: one trained adapter evaluated truncated to each rank; median over seeds (± std) per task."""
    scores = rank_scores(rows) if scores is None else scores
    if scores.empty:
        raise ReportError("no row has rank_scores_json (DyLoRA's per-rank scores): nothing to plot")
    groups = group_frame(ok_rows(rows))
    styles = variant_styles(groups)
    tasks = sorted(set(scores.task), key=task_position)
    fig, axes = figure(len(tasks))
    scores = scores.assign(score=[v * task_scale(rows, t) for v, t in zip(scores.score, scores.task)])
    stats = scores.groupby(["group", "task", "rank"], sort=False).score.agg(["median", "std"]).reset_index()
    for ax, task in zip(axes, tasks):
        for row in groups.itertuples():
            part = stats[(stats.group == row.group) & (stats.task == task)].sort_values("rank")
            if part.empty:
                continue
            ax.errorbar(part["rank"], part["median"], yerr=part["std"].fillna(0), capsize=3, linewidth=1.6,
                        label=f"{series_label(row.variant, row.impl, row.rank)} (trained)",
                        linestyle=rank_linestyle(groups, row.variant, row.rank), **styles[(row.variant, row.impl)])
        ax.set_xscale("log", base=2)
        ticks = sorted(set(stats[stats.task == task]["rank"].dropna().astype(int)))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        finish_axes(ax, f"{TASK_LABELS.get(task, task)}: score by evaluated rank",
                    "rank used at evaluation (log scale)", primary_of(rows, task))
    fig.suptitle("DyLoRA: one adapter, scored at every rank up to the trained one, at its best evaluation "
                 "(median over seeds, bars: std)")
    legend_below(fig, axes)
    return fig


def save_figure(fig, folder: Path, name: str) -> list[Path]:
    """PNG (150 dpi) and SVG, without timestamps so unchanged plots keep their bytes."""
    import matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    with matplotlib.rc_context(PLOT_STYLE):
        fig.savefig(paths[0], dpi=150, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None, "Creator": None})
    return paths


def planned_plots(rows: pd.DataFrame, table: PaperTable, efficiency: pd.DataFrame) -> dict[str, Callable]:
    """The plots this data supports, by file name, without drawing them (the README lists them either way)."""
    plots: dict[str, Callable] = {}
    if table.groups["rank"].notna().any():
        plots["score_vs_rank"] = lambda: plot_score_vs_rank(table)
    plots["score_vs_params"] = lambda: plot_score_vs_params(table)
    plots["efficiency"] = lambda: plot_efficiency(efficiency)
    ok = ok_rows(rows)
    if any((Path(a) / "history.parquet").exists() for a in ok.artifacts):
        plots["training_curves"] = lambda: plot_training_curves(rows)
    if ok.rank_scores_json.notna().any():
        plots["rank_curve"] = lambda: plot_rank_curve(rows)
    return plots


# ---- writing and checking ----------------------------------------------------------------------------
def build(rows: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL,
          selection: str = "eval_best") -> tuple[dict[str, str], dict[str, Callable]]:
    """Every text output ({file name: content}) and the plots ({name: draw()}) for `rows`, scored at the
    evaluation `selection` names (eval_best, the papers' protocol; last; heldout)."""
    rows = apply_selection(rows, selection)
    table = paper_table(rows, resamples=resamples, seed=seed, level=level)
    full = paper_table(rows, extra_metrics=True, resamples=resamples, seed=seed, level=level)
    efficiency = efficiency_frame(rows)
    params = param_count_frame()
    grids = {"table": results_grid(table), "efficiency": efficiency_grid(efficiency),
             "param_counts": param_count_grid(params)}
    texts = {}
    for name, grid in grids.items():
        texts[f"{name}.md"] = markdown(grid)
        texts[f"{name}.tex"] = latex(grid)
    texts["table.csv"] = csv_text(results_csv(full))
    texts["failures.csv"] = csv_text(table.failures)
    texts["efficiency.csv"] = csv_text(efficiency)
    texts["param_counts.csv"] = csv_text(params)
    plots = planned_plots(rows, table, efficiency)
    texts["README.md"] = index_page(rows, texts, plots)
    return texts, plots


def index_page(rows: pd.DataFrame, texts: Mapping[str, str], plots: Mapping[str, Callable]) -> str:
    counts = rows.status.value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in results_io.STATUSES if s in counts)
    sweeps = ", ".join(sorted(set(rows.sweep.dropna())))
    lines = ["# Report", "",
             f"Generated by `python -m harness.report` from {len(rows)} rows ({status}) of sweep(s) {sweeps}. "
             "Do not edit: CI regenerates these files and fails when they differ (`--check`).", "",
             "## Results", "", texts["table.md"], "## Efficiency", "", texts["efficiency.md"],
             "## Trainable parameters: ours and the papers'", "", texts["param_counts.md"], "## Plots", ""]
    for name in plots:
        lines += [f"### {name.replace('_', ' ').capitalize()}", "", f"![{name}](plots/{name}.png) "
                  f"([SVG](plots/{name}.svg))", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(dirs: Sequence[str | Path], out: str | Path | None = None, plots: bool = True,
                 resamples: int = RESAMPLES, seed: int = SEED, selection: str = "eval_best") -> Path:
    """Write the tables (and plots) for the rows under `dirs` into `out` (default `<dir>/report`)."""
    out = default_out(dirs) if out is None else Path(out)
    rows = load(*dirs)
    texts, drawings = build(rows, resamples, seed, selection=selection)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)
    if plots:
        for name, draw in drawings.items():
            save_figure(draw(), out / "plots", name)
    return out


def default_out(dirs: Sequence[str | Path]) -> Path:
    if len(dirs) != 1:
        raise ReportError("with several results folders, say where the report goes: --out <folder>")
    return Path(dirs[0]) / "report"


def check(dirs: Sequence[str | Path], out: str | Path | None = None, resamples: int = RESAMPLES,
          seed: int = SEED, stream=None) -> bool:
    """Regenerate the text outputs and compare them with the ones in `out`; print a diff; True if equal."""
    stream = sys.stdout if stream is None else stream
    out = default_out(dirs) if out is None else Path(out)
    texts, _ = build(load(*dirs), resamples, seed)
    committed = {p.name for p in out.glob("*") if p.suffix in TEXT_SUFFIXES} if out.is_dir() else set()
    same = True
    for name in sorted(set(texts) | committed):
        old = (out / name).read_text() if name in committed else ""
        new = texts.get(name, "")
        if old != new:
            same = False
            what = "missing" if name not in committed else "stale (not generated any more)" if name not in texts \
                else "differs"
            print(f"--check: {out / name} {what}", file=stream)
            stream.writelines(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                                   f"committed/{name}", f"regenerated/{name}"))
    if not same:
        print(f"--check: the committed report is out of date; regenerate it with "
              f"`python -m harness.report {' '.join(map(str, dirs))}` and commit it", file=stream)
    return same


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="results folders: results/<sweep> or a folder of sweeps")
    parser.add_argument("--out", help="where the report goes (default: <dir>/report; required for several dirs)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate the tables and exit 1 with a diff when the committed ones differ")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="bootstrap seed (default %(default)s)")
    parser.add_argument("--selection", choices=list(SELECTIONS), default="eval_best",
                        help="which evaluation each run is scored at: eval_best (the papers' protocol, default), last, "
                             "or heldout (runs trained with train.selection=heldout); the caption says which")
    parser.add_argument("--inflation", action="store_true",
                        help="print, per variant and task, how many points eval_best adds over last, and exit")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    try:
        if args.inflation:
            print(inflation_table(load(*args.dirs)), end="")
            return 0
        if args.check:
            return 0 if check(args.dirs, args.out, args.resamples, args.seed) else 1
        out = write_report(args.dirs, args.out, not args.no_plots, args.resamples, args.seed, args.selection)
    except ReportError as err:
        print(f"harness.report: {err}", file=sys.stderr)
        return 2
    print(f"report written to {out}/ (README.md, table.md/.tex/.csv, efficiency.*, param_counts.*"
          + ("" if args.no_plots else ", plots/") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
