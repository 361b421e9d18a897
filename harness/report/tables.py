"""The numbers behind the tables: the paper-style results table, efficiency, parameter counts."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import ReportError
from harness.report.labels import (COMPANIONS, EXTRAS, TASK_ORDER, column_label, task_label, task_position,
                                   variant_label)
from harness.report.rows import (COLD_SUFFIX, SELECTIONS, failures, method_group, ok_rows, read_predictions,
                                 warm_started)
from harness.report.statistics import BOOTSTRAP_SCALE, LEVEL, RESAMPLES, SEED, paired_bootstrap


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
                          "primary": column.primary, **seed_statistics(values),
                          "seeds": ";".join(f"{int(s)}:{v:.6f}" for s, v in zip(part.seed[values.index], values)),
                          "holdout": bool(part.holdout.any()), "warm": bool(warm_started(part).any()),
                          "degenerate": int((part.degenerate == True).sum()) if "degenerate" in part else 0})  # noqa: E712
    cells = pd.DataFrame(cells)
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


def seed_statistics(values: pd.Series) -> dict:
    """A cell's numbers over its seeds: count, median, sample std, min, max (NaN where undefined). Rounded to 9
    decimals: float noise (an MCC of -1e-17) must neither pick the bold cell nor print as -0.0."""
    n = len(values)
    stats = {"median": values.median() if n else np.nan, "std": values.std(ddof=1) if n > 1 else np.nan,
             "min": values.min() if n else np.nan, "max": values.max() if n else np.nan}
    return {"n_seeds": n, **{k: round(float(v), 9) + 0.0 for k, v in stats.items()}}


def group_frame(ok: pd.DataFrame) -> pd.DataFrame:
    """The table's rows in order, with the trainable parameters without the head (one value, or a range)."""
    first = ok.drop_duplicates("group")
    # a method's row without warm start right after the method's own row
    order = [g for g in first.group if not g.endswith(COLD_SUFFIX)]
    for cold in (g for g in first.group if g.endswith(COLD_SUFFIX)):
        base = cold.removesuffix(COLD_SUFFIX)
        order.insert(order.index(base) + 1 if base in order else len(order), cold)
    first = first.set_index("group", drop=False).loc[order].reset_index(drop=True)
    params = ok.groupby("group").trainable_params_no_head.agg(["min", "max"])
    frame = pd.DataFrame({"group": first.group, "model": first.model, "variant": first.variant,
                          "rank": first["rank"], "impl": first.impl,
                          "start": first["start"] if "start" in first else ""}).reset_index(drop=True)
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
                    "warm": False, "degenerate": 0, "dead": False})
    return pd.DataFrame(out)


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
            lines.append(f"Training budgets differ on {task_label(task)}: "
                         + "; ".join(f"{b} ({v})" for b, v in budgets.items()))
    return lines


def mark_ties(cells: pd.DataFrame, ok: pd.DataFrame, columns: list[Column], resamples: int, seed: int,
              level: float) -> tuple[pd.DataFrame, list[str]]:
    """Run the paired bootstrap per model x column against the column's best; fill tied/interval columns."""
    cells = cells.assign(tied=pd.array([pd.NA] * len(cells), dtype="boolean"), diff_low=np.nan,
                         diff_high=np.nan, p_at_least_as_good=np.nan, examples=pd.array([pd.NA] * len(cells),
                                                                                       dtype="Int64"))
    untested = []
    predictions = prediction_reader(ok)
    for column in columns:
        for model in sorted(set(ok.model)):
            mine = cells[(cells.column == column.label) & (cells.model == model)].dropna(subset=["median"])
            if mine.empty:
                continue
            reference = mine[mine.best].group.iloc[0]
            frames, missing = cell_predictions(ok, mine.group, column, predictions)
            if reference not in frames:
                untested.append(f"{column.label}: the best row has no saved predictions, nothing tested")
                continue
            if missing:
                untested.append(f"{column.label}: no saved predictions for {', '.join(sorted(missing))}")
            # one stream per column: stable under additions
            test, notes = column_bootstrap(frames, column, reference, f"{model}/{column.label}", resamples, seed,
                                           level)
            untested += notes
            if test is None:
                continue
            rows = (cells.column == column.label) & cells.group.isin(test.index)
            for name in ("tied", "diff_low", "diff_high", "p_at_least_as_good", "examples"):
                cells.loc[rows, name] = cells.loc[rows, "group"].map(test[name]).to_numpy()
    return cells, untested


def column_bootstrap(frames: dict[str, list[pd.DataFrame]], column: Column, reference: str, stream: str,
                     resamples: int, seed: int, level: float, constants: dict[str, float] | None = None
                     ) -> tuple[pd.DataFrame | None, list[str]]:
    """`paired_bootstrap` for one table column, `stream` naming its random stream: observed scores and the
    interval of (reference − row) in the table's points, rounded to 4 decimals (a last-bit difference in a
    BLAS sum must not make --check fail on another machine); and notes on what could not be tested as asked."""
    try:
        test = paired_bootstrap(frames, column.base_metric, reference, resamples,
                                [seed, zlib.crc32(stream.encode())], level, constants)
    except ReportError as err:  # e.g. data.max_eval_samples drew a different subset for every seed
        return None, [f"{column.label}: not tested, {err}"]
    notes = []
    if int(test.examples.iloc[0]) < int(test.examples_any_seed.iloc[0]):
        notes.append(f"{column.label}: the seeds scored different example sets; the test used the "
                     f"{int(test.examples.iloc[0])} of {int(test.examples_any_seed.iloc[0])} they share")
    test = test.copy()
    points = ["observed", "diff_low", "diff_high"]
    test[points] = test[points] * BOOTSTRAP_SCALE
    rounded = [*points, "p_at_least_as_good"]
    test[rounded] = test[rounded].astype(float).round(4) + 0.0
    return test, notes


def prediction_reader(ok: pd.DataFrame) -> Callable[[str, str | None], pd.DataFrame | None]:
    """read_predictions(artifacts, checkpoint, split) at the rows' --selection checkpoint, each file read once."""
    checkpoint = str(ok.checkpoint.iloc[0]) if "checkpoint" in ok and len(ok) else "best"
    cache: dict[tuple[str, str | None], pd.DataFrame | None] = {}

    def predictions(artifacts: str, split: str | None) -> pd.DataFrame | None:
        if (artifacts, split) not in cache:
            cache[(artifacts, split)] = read_predictions(artifacts, checkpoint, split)
        return cache[(artifacts, split)]

    return predictions


def cell_predictions(ok: pd.DataFrame, groups: Iterable[str], column: Column, predictions: Callable
                     ) -> tuple[dict[str, list[pd.DataFrame]], list[str]]:
    """Per group, the prediction frames of its runs (one per seed) for `column`; and the groups with a run
    whose predictions were not saved (those cannot be tested)."""
    frames, missing = {}, []
    for group in groups:
        runs = ok[(ok.group == group) & (ok.task == column.task)]
        found = [predictions(a, column.split) for a in runs.artifacts]
        if any(f is None or f.empty for f in found):
            missing.append(group)
        else:
            frames[group] = found
    return frames, missing


def head_note(ok: pd.DataFrame) -> str:
    """The head's size, stated once: every variant trains it, so the parameter column leaves it out."""
    sizes = ok.groupby(["model", "head_params"]).task.agg(lambda t: sorted(set(t), key=task_position))
    parts = []
    for (model, size), tasks in sizes.items():
        parts.append(f"{int(size):,} for {model} on {', '.join(task_label(t) for t in tasks)}")
    return ("Trainable parameters exclude the task head (classifier, or QA outputs; for BERT-family encoders "
            "also the pooler), which every variant trains: " + "; ".join(parts) + ".")



# ---- efficiency --------------------------------------------------------------------------------------
EFFICIENCY_BYTES = ("peak_memory_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes",
                    "saved_activation_bytes", "account_bytes", "adapter_bytes")
# Whole-run seconds (rows written before these columns have none: the table then leaves them out)
EFFICIENCY_TIMES = {"wall_seconds": "Wall s", "setup_seconds": "Setup s"}


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
    ok = ok.assign(group=method_group(ok.group), start="")  # a warm start changes scores, not cost: one row per method
    ok = ok.assign(
        peak_memory_bytes=ok.cuda_peak_allocated_bytes.fillna(ok.cpu_peak_rss_bytes),
        peak_memory_kind=np.where(ok.cuda_peak_allocated_bytes.notna(), "CUDA allocated", "CPU RSS"),
        account_bytes=ok[["param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes"]]
        .sum(axis=1, min_count=4))
    measures = ["train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s", *EFFICIENCY_BYTES,
                *(c for c in EFFICIENCY_TIMES if c in ok and ok[c].notna().any())]
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


# ---- our parameter counts next to the papers' --------------------------------------------------------
PARAM_MODELS = ("roberta_base", "roberta_large")
# The papers' trainable-parameter counts, the overrides that reproduce each setting here, and our counts for
# them (ours, head_params: harness.inspect on random-init roberta-base/large with RTE's 2-label head).
# tests/test_report_tables.py recomputes ours with harness.inspect, so the report needs no model to show them.
PUBLISHED_PARAMS = Path(__file__).with_name("published_params.csv")


def parse_count(text: str) -> float:
    """A count as papers print it (0.3M, 73.7K, 512) as a number."""
    found = re.fullmatch(r"([\d.]+)([KMB]?)", text)
    if found is None:
        raise ReportError(f"published count {text!r} in {PUBLISHED_PARAMS} is not a number with an optional "
                          "K/M/B suffix, e.g. 0.3M")
    number, unit = found.groups()
    return float(number) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit]


def published_params(path: str | Path = PUBLISHED_PARAMS) -> pd.DataFrame:
    """The committed counts: one row per variant setting and model (`counted`: whole model or without head)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.astype({"ours": "int64", "head_params": "int64"})


def param_count_frame(variants: Iterable[str] | None = None) -> pd.DataFrame:
    """Our trainable-parameter counts next to the published ones (all of them, or those of `variants`)."""
    frame = published_params()
    if variants is not None:
        frame = frame[frame.variant.isin(set(variants))]
    out = []
    for entry in frame.itertuples(index=False):
        out.append({"variant": entry.variant, "setting": entry.setting, "model": entry.model,
                    "counted": entry.counted, "ours": entry.ours, "published": entry.published,
                    "ratio": entry.ours / parse_count(entry.published), "head_params": entry.head_params,
                    "source": entry.source, "overrides": entry.overrides})
    return pd.DataFrame(out, columns=["variant", "setting", "model", "counted", "ours", "published", "ratio",
                                      "head_params", "source", "overrides"])



# ---- eval_best's inflation ---------------------------------------------------------------------------
def inflation_table(rows: pd.DataFrame) -> str:
    """Markdown: per variant (row) and task (column), the median over seeds of score_best − score_last in points
    (x100 for GLUE): how much the papers' eval_best protocol adds over reporting the last evaluation."""
    ok = ok_rows(rows)
    tasks = sorted(set(ok.task), key=task_position)
    scales = {t: 100.0 if (ok[ok.task == t].kind == "glue").any() else 1.0 for t in tasks}  # as the table shows
    lines = ["| Method | r | " + " | ".join(task_label(t) for t in tasks) + " | Mean |",
             "|:---|---:|" + "---:|" * (len(tasks) + 1)]
    for group, part in ok.groupby("group", sort=False):
        gaps = [((p.score_best - p.score_last) * scales[t]).median()
                for t in tasks for p in [part[part.task == t]]]
        first = part.iloc[0]
        rank = "–" if pd.isna(first["rank"]) else str(int(first["rank"]))
        start = f" ({first.start})" if first.start else ""
        lines.append(f"| {variant_label(first.variant)}{start} | {rank} | "
                     + " | ".join("–" if pd.isna(g) else f"{g:.1f}" for g in gaps)
                     + f" | {np.nanmean(gaps):.1f} |")
    return "\n".join(lines) + "\n"
