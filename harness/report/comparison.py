"""What each method buys over LoRA, task by task, and how far each gets by its first evaluation.

The results table says which rows the best one cannot be told from; a reader choosing an adapter asks a
different question: is this method better or worse than plain LoRA here, by how much, and is that real? The
comparison answers it with the same paired bootstrap (all seeds, the table's --selection checkpoint), the
reference being LoRA. The first-evaluation table is the convergence view: the score after the first epoch,
where LoRA+'s claim (a larger learning rate for B converges faster) shows first.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.errors import ReportError
from harness.report.labels import variant_label
from harness.report.render import Cell, Grid, fixed, format_count, row_label_cells, row_label_header
from harness.report.rows import histories, ok_rows
from harness.report.statistics import BOOTSTRAP_SCALE, paired_bootstrap
from harness.report.tables import PaperTable, cell_predictions, prediction_reader

REFERENCE_VARIANT = "lora"


@dataclass
class Comparison:
    """Per model, every other table row against the reference row: `cells` holds one line per (group,
    column) with `diff` (row − reference, in the table's points), its interval and `significant`."""

    references: dict[str, str]  # model -> the reference group
    table: PaperTable
    cells: pd.DataFrame
    untested: list[str] = field(default_factory=list)


def reference_group(groups: pd.DataFrame, ok: pd.DataFrame) -> str | None:
    """The model's LoRA row (ours, with the usual warm start): the one with the most runs, then the lowest rank."""
    candidates = groups[(groups.variant == REFERENCE_VARIANT) & (groups.impl == "ours")
                        & (groups.get("start", "") == "")]
    if candidates.empty:
        return None
    runs = ok.group.value_counts()
    return min(candidates.itertuples(), key=lambda g: (-runs.get(g.group, 0), -1 if pd.isna(g.rank) else g.rank)).group


def against_reference(table: PaperTable, rows: pd.DataFrame) -> Comparison | None:
    """Every row of `table` (built from `rows`) against its model's LoRA row, column by column; None when no
    model has one."""
    ok = ok_rows(rows)
    predictions = prediction_reader(ok)
    references, lines, untested = {}, [], []
    for model in sorted(set(table.groups.model)):
        groups = table.groups[table.groups.model == model]
        reference = reference_group(groups, ok)
        if reference is None:
            continue
        references[model] = reference
        for column in table.columns:
            present = [g for g in groups.group
                       if (cell := table.cell(g, column.label)) is not None and pd.notna(cell["median"])]
            if reference not in present or len(present) < 2:
                continue
            frames, missing = cell_predictions(ok, present, column, predictions)
            if missing:
                untested.append(f"{column.label}: no saved predictions for {', '.join(sorted(missing))}")
            if reference not in frames or len(frames) < 2:
                continue
            stream = zlib.crc32(f"{model}/{column.label}/vs/{reference}".encode())
            try:
                test = paired_bootstrap(frames, column.base_metric, reference, table.resamples,
                                        [table.seed, stream], table.level)
            except ReportError as err:
                untested.append(f"{column.label}: not tested, {err}")
                continue
            base = test.loc[reference, "observed"]
            for group, result in test.drop(index=reference).iterrows():
                # paired_bootstrap's interval is of (reference − row); the comparison reads row − reference
                low, high = -result.diff_high * BOOTSTRAP_SCALE, -result.diff_low * BOOTSTRAP_SCALE
                lines.append({"group": group, "reference": reference, "column": column.label, "task": column.task,
                              "diff": (result.observed - base) * BOOTSTRAP_SCALE, "diff_low": low, "diff_high": high,
                              "significant": bool(pd.notna(low) and not low <= 0 <= high),
                              "p_at_least_as_good": result.p_at_least_as_good,
                              "examples": int(result.examples)})
    if not references:
        return None
    cells = pd.DataFrame(lines, columns=["group", "reference", "column", "task", "diff", "diff_low", "diff_high",
                                         "significant", "p_at_least_as_good", "examples"])
    # 4 decimals, as the results table: a last-bit BLAS difference must not make --check fail elsewhere
    rounded = ["diff", "diff_low", "diff_high", "p_at_least_as_good"]
    cells[rounded] = cells[rounded].astype(float).round(4) + 0.0
    return Comparison(references, table, cells, untested)


def signed(value: float) -> str:
    text = fixed(value)
    return text if text.startswith("-") or text == "0.0" else f"+{text}"


def comparison_grid(comparison: Comparison) -> Grid:
    table = comparison.table
    labels = [c.label for c in table.columns]
    header = row_label_header(table.groups) + [Cell("# Trainable params")] + [Cell(label) for label in labels]
    body = []
    for row in table.groups.itertuples(index=False):
        row = pd.Series(row._asdict())
        if row.group in comparison.references.values():
            continue
        line = row_label_cells(table.groups, row) + [Cell(format_count(row.params_min))]
        for label in labels:
            hit = comparison.cells[(comparison.cells.group == row.group) & (comparison.cells.column == label)]
            if hit.empty:
                line.append(Cell("–"))
                continue
            cell = hit.iloc[0]
            degenerate = any(bool(table.cell(group, label).get("degenerate", 0))
                             for group in (row.group, cell.reference))
            line.append(Cell(f"{signed(cell['diff'])} [{fixed(cell.diff_low)}, {fixed(cell.diff_high)}]",
                             bold=bool(cell.significant), degenerate=degenerate))
        body.append(line)
    chosen = table.groups[table.groups.group.isin(comparison.references.values())]
    several = table.groups.model.nunique() > 1
    references = [f"{variant_label(r.variant)} r={int(r['rank'])}" + (f" ({r.model})" if several else "")
                  for _, r in chosen.iterrows()]
    caption = (f"Each method against {', '.join(references)}: the row's score minus LoRA's, in the results table's "
               f"points and at its checkpoint ({table.selection}), with the {table.level:.0%} interval of a paired "
               f"bootstrap over validation examples ({table.resamples} resamples, all seeds, each resample scored as "
               "the median over seeds). Bold: the interval excludes 0, the difference is real at this budget; "
               "otherwise this data cannot tell the two apart.")
    notes = ["° the row's or LoRA's cell holds a degenerate run (constant predictions, see the results table)."]
    notes += [f"Not tested: {line}." for line in comparison.untested]
    align = "l" * len(row_label_header(table.groups)) + "r" * (1 + len(labels))
    return Grid(caption, header, body, align, notes, "tab:comparison")


def first_evaluations(table: PaperTable, rows: pd.DataFrame) -> pd.DataFrame:
    """Per table row and task: the primary score at each run's first evaluation (median over seeds, in the
    table's points), the epoch it came at, and the table's own score for the row (at its --selection)."""
    curves = histories(rows)
    if curves.empty:
        return pd.DataFrame(columns=["group", "task", "column", "epoch", "n_seeds", "median", "std", "final"])
    primary = {c.task: c for c in table.columns if c.primary}
    first = curves.sort_values("step").groupby("run_key", sort=False).head(1)
    out = []
    for (group, task), part in first.groupby(["group", "task"], sort=False):
        column = primary.get(task)
        if column is None or group not in set(table.groups.group):
            continue
        values = part.score * column.scale
        final = table.cell(group, column.label)
        out.append({"group": group, "task": task, "column": column.label, "epoch": float(part.epoch.median()),
                    "n_seeds": len(values), "median": round(float(values.median()), 9) + 0.0,
                    "std": round(float(values.std(ddof=1)), 9) + 0.0 if len(values) > 1 else np.nan,
                    "final": np.nan if final is None else final["median"]})
    return pd.DataFrame(out)


def first_evaluation_grid(table: PaperTable, frame: pd.DataFrame) -> Grid:
    labels = [c.label for c in table.columns if c.primary]
    header = row_label_header(table.groups) + [Cell(label) for label in labels]
    best = frame.groupby("column")["median"].transform("max").eq(frame["median"]) if len(frame) else frame
    frame = frame.assign(best=best)
    body = []
    for row in table.groups.itertuples(index=False):
        row = pd.Series(row._asdict())
        line = row_label_cells(table.groups, row)
        for label in labels:
            hit = frame[(frame.group == row.group) & (frame.column == label)]
            if hit.empty:
                line.append(Cell("–"))
                continue
            cell = hit.iloc[0]
            line.append(Cell(fixed(cell["median"]), std="" if pd.isna(cell["std"]) else fixed(cell["std"]),
                             bold=bool(cell.best)))
        body.append(line)
    epochs = frame.groupby("column").epoch.agg(lambda e: "/".join(f"{v:g}" for v in sorted(set(e))))
    when = (f"epoch {epochs.iloc[0]}" if epochs.nunique() == 1 else
            "epoch " + ", ".join(f"{epochs[label]} on {label}" for label in labels if label in epochs))
    caption = ("How far each method gets by its first evaluation: the primary score at each run's first "
               f"evaluation ({when}), median over seeds ± std, in the results table's points. Bold: highest in "
               "the column. Compare with the results table for where each run ends: a method that converges "
               "faster is further ahead here than there.")
    align = "l" * len(row_label_header(table.groups)) + "r" * len(labels)
    return Grid(caption, header, body, align, [], "tab:first-evaluation")
