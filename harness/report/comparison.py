"""What each method buys over LoRA, task by task, and how far each gets by its first evaluation.

The results table says which rows the best one cannot be told from; a reader choosing an adapter asks a
different question: is this method better or worse than plain LoRA here, by how much, and is that real? The
comparison answers it with the same paired bootstrap (all seeds, the table's --selection checkpoint), one test per
row against LoRA. The first-evaluation table is the convergence view: the score after the first epoch, where
LoRA+'s claim (a larger learning rate for B converges faster) shows first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.report.labels import variant_label
from harness.report.render import Cell, Grid, fixed, params_cell, row_label_cells, row_label_header
from harness.report.rows import histories, ok_rows
from harness.report.tables import (Column, PaperTable, cell_predictions, column_bootstrap, prediction_reader,
                                   seed_statistics)

REFERENCE_VARIANT = "lora"
# The no-skill baseline, compared with LoRA like a method: predicting the most frequent label of the evaluation
# examples for every one of them (the best constant prediction there; MCC 0). A constant prediction's correlation
# is undefined; the baseline of a regression column scores 0 instead.
MAJORITY = "majority class"
CORRELATIONS = ("pearson", "spearman")


@dataclass
class Comparison:
    """Per model, every other table row against the model's LoRA row: `cells` holds one line per (group,
    column) with `diff` (row − LoRA, in the table's points), its interval and `significant`."""

    references: dict[str, str]  # model -> the reference group
    table: PaperTable
    cells: pd.DataFrame
    untested: list[str] = field(default_factory=list)


def reference_group(groups: pd.DataFrame, ok: pd.DataFrame) -> str | None:
    """The model's LoRA row (ours, not a "(no warm start)" row): the one with the most runs, then the lowest rank."""
    candidates = groups[(groups.variant == REFERENCE_VARIANT) & (groups.impl == "ours")
                        & (groups.start.fillna("") == "")]
    if candidates.empty:
        return None
    runs = ok.group.value_counts()
    return min(candidates.itertuples(), key=lambda g: (-runs.get(g.group, 0), -1 if pd.isna(g.rank) else g.rank)).group


def has_score(table: PaperTable, group: str, label: str) -> bool:
    cell = table.cell(group, label)
    return cell is not None and pd.notna(cell["median"])


def against_reference(table: PaperTable, rows: pd.DataFrame) -> Comparison | None:
    """Every row of `table` (built from `rows`) against its model's LoRA row, column by column, each pair
    bootstrapped on the examples both scored; None when no model has a LoRA row."""
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
            others = [g for g in groups.group if g != reference and has_score(table, g, column.label)]
            if not others:
                continue
            if not has_score(table, reference, column.label):
                untested.append(f"{column.label}: LoRA has no score there, nothing compared")
                continue
            frames, missing = cell_predictions(ok, [reference, *others], column, predictions)
            if reference in missing:
                untested.append(f"{column.label}: LoRA's predictions were not saved, nothing compared")
                continue
            if missing:
                untested.append(f"{column.label}: no saved predictions for {', '.join(sorted(missing))}")
            for group in (g for g in others if g in frames):
                pair = {reference: frames[reference], group: frames[group]}
                test, notes = column_bootstrap(pair, column, reference, f"{model}/{column.label}/{group}",
                                               table.resamples, table.seed, table.level)
                untested += notes
                if test is not None:
                    warm_differs = table.cell(group, column.label).warm != table.cell(reference, column.label).warm
                    lines.append(difference_line(test, group, reference, column, bool(warm_differs)))
            if "label" in frames[reference][0]:  # GLUE (SQuAD's predictions have no label: no such baseline)
                test, notes = against_majority(frames[reference], column, reference, f"{model}/{column.label}/"
                                               f"{MAJORITY}", table)
                untested += notes
                if test is not None:
                    lines.append(difference_line(test, MAJORITY, reference, column, False))
    if not references:
        return None
    cells = pd.DataFrame(lines, columns=["group", "reference", "column", "task", "diff", "diff_low", "diff_high",
                                         "significant", "p_at_least_as_good", "examples", "warm_differs", "score"])
    return Comparison(references, table, cells, list(dict.fromkeys(untested)))


def against_majority(frames: list[pd.DataFrame], column: Column, reference: str, stream: str, table: PaperTable
                     ) -> tuple[pd.DataFrame | None, list[str]]:
    """The reference's runs against the majority-class baseline on the examples they scored (`MAJORITY`)."""
    if column.base_metric in CORRELATIONS:
        return column_bootstrap({reference: frames}, column, reference, stream, table.resamples, table.seed,
                                table.level, constants={MAJORITY: 0.0})
    labels = frames[0]["label"].to_numpy()
    majority = frames[0][[c for c in frames[0] if c != "prediction"]].assign(
        prediction=np.bincount(labels.astype(np.int64)).argmax())
    return column_bootstrap({reference: frames, MAJORITY: [majority]}, column, reference, stream, table.resamples,
                            table.seed, table.level)


def difference_line(test: pd.DataFrame, group: str, reference: str, column: Column, warm_differs: bool) -> dict:
    """One line of `Comparison.cells` from a two-group `column_bootstrap`: `group` − `reference`."""
    # column_bootstrap's interval is of (reference − row); the comparison reads row − reference
    low, high = -test.at[group, "diff_high"] + 0.0, -test.at[group, "diff_low"] + 0.0
    return {"group": group, "reference": reference, "column": column.label, "task": column.task,
            "diff": round(test.at[group, "observed"] - test.at[reference, "observed"], 4) + 0.0,
            "diff_low": low, "diff_high": high,
            "significant": bool(pd.notna(low) and pd.notna(high) and not low <= 0 <= high),
            "p_at_least_as_good": test.at[group, "p_at_least_as_good"], "examples": int(test.at[group, "examples"]),
            "warm_differs": warm_differs, "score": test.at[group, "observed"]}


def signed(value: float) -> str:
    """One decimal with its sign, kept where it rounds to zero: an interval [+0.0, +0.4] excludes 0, [0.0, ...]
    touches it."""
    if pd.isna(value):
        return "–"
    return "0.0" if value == 0 else f"{value:+.1f}"


def comparison_grid(comparison: Comparison) -> Grid:
    table = comparison.table
    labels = [c.label for c in table.columns]
    shown = table.groups[table.groups.model.isin(comparison.references)
                         & ~table.groups.group.isin(comparison.references.values())]
    header = row_label_header(table.groups) + [Cell("# Trainable params")] + [Cell(label) for label in labels]
    body, degenerate_seen, warm_seen = [], False, False

    def difference_cells(found: pd.DataFrame, group: str) -> list[Cell]:
        nonlocal degenerate_seen, warm_seen
        cells = []
        for label in labels:
            hit = found[found.column == label]
            if hit.empty:
                cells.append(Cell("–"))
                continue
            cell = hit.iloc[0]
            degenerate = any(bool(table.cell(g, label).get("degenerate", 0))
                             for g in (group, cell.reference) if table.cell(g, label) is not None)
            degenerate_seen |= degenerate
            warm_seen |= bool(cell.warm_differs)
            cells.append(Cell(f"{signed(cell['diff'])} [{signed(cell.diff_low)}, {signed(cell.diff_high)}]",
                              bold=bool(cell.significant), degenerate=degenerate, warm=bool(cell.warm_differs)))
        return cells

    for row in shown.itertuples(index=False):
        row = pd.Series(row._asdict())
        body.append(row_label_cells(table.groups, row) + [params_cell(row)]
                    + difference_cells(comparison.cells[comparison.cells.group == row.group], row.group))
    baselines = comparison.cells[comparison.cells.group == MAJORITY]
    for model, reference in comparison.references.items():
        found = baselines[baselines.reference == reference]
        if len(found):
            label = pd.Series({"model": model, "variant": "Majority class", "start": "", "rank": np.nan,
                               "impl": "–"})
            body.append(row_label_cells(table.groups, label) + [Cell("–")] + difference_cells(found, MAJORITY))
    chosen = table.groups[table.groups.group.isin(comparison.references.values())]
    several = table.groups.model.nunique() > 1
    references = [f"{variant_label(r.variant)} r={int(r['rank'])}" + (f" ({r.model})" if several else "")
                  for _, r in chosen.iterrows()]
    caption = (f"Each method against {', '.join(references)}: the row's score minus LoRA's, in the results table's "
               f"points and at its checkpoint ({table.selection}), with the {table.level:.0%} interval of a paired "
               f"bootstrap over the validation examples both scored ({table.resamples} resamples, all seeds, each "
               "resample scored as the median over seeds). Bold: the interval excludes 0, the difference is real at "
               "this budget; otherwise this data cannot tell the two apart.")
    notes = []
    if len(baselines):
        scores = baselines.drop_duplicates("column").set_index("column").score
        notes.append("Majority class: the most frequent label of the evaluation examples, predicted for every one "
                     "(the best constant prediction; MCC 0; a constant's correlation is undefined and counts as 0), "
                     "on the examples LoRA scored: " + ", ".join(f"{label} {scores[label]:.1f}" for label in labels
                                                                  if label in scores.index)
                     + ". Bold there: LoRA is above (or below) it beyond this data's noise.")
    if warm_seen:
        notes.append("‡ One of the two started from its MNLI run and the other did not (init_from; the results "
                     "table marks which): the difference includes the warm start's effect.")
    if degenerate_seen:
        notes.append("° The row's or LoRA's cell holds a degenerate run (constant predictions; see the results "
                     "table).")
    notes += [f"Not compared: {line}." for line in comparison.untested]
    align = "l" * len(row_label_header(table.groups)) + "r" * (1 + len(labels))
    return Grid(caption, header, body, align, notes, "tab:comparison")


def first_evaluations(table: PaperTable, rows: pd.DataFrame) -> pd.DataFrame:
    """Per table row and task, in table order: the primary score at each run's first evaluation (the seed
    statistics, in the table's points), the epoch it came at, and the table's own score for the row."""
    columns = ["group", "model", "task", "column", "epoch", "n_seeds", "median", "std", "min", "max", "warm", "final"]
    curves = histories(rows)
    if curves.empty:
        return pd.DataFrame(columns=columns)
    first = curves.sort_values(["run_key", "step"], kind="stable").drop_duplicates("run_key")
    out = []
    for row in table.groups.itertuples(index=False):
        for column in (c for c in table.columns if c.primary):
            part = first[(first.group == row.group) & (first.task == column.task)]
            if part.empty:
                continue
            final = table.cell(row.group, column.label)
            out.append({"group": row.group, "model": row.model, "task": column.task, "column": column.label,
                        "epoch": float(part.epoch.median()), **seed_statistics((part.score * column.scale).dropna()),
                        "warm": bool(final is not None and final.warm),
                        "final": np.nan if final is None else final["median"]})
    return pd.DataFrame(out, columns=columns)


def first_evaluation_grid(table: PaperTable, frame: pd.DataFrame) -> Grid:
    labels = [c.label for c in table.columns if c.primary]
    header = row_label_header(table.groups) + [Cell(label) for label in labels]
    by_column = frame.groupby(["model", "column"])["median"]
    # bold the best of a column, unless every row has the same score there (CoLA's MCC 0 everywhere)
    frame = frame.assign(best=by_column.transform("max").eq(frame["median"]) & by_column.transform("nunique").gt(1))
    max_seeds = int(frame.n_seeds.max()) if len(frame) else 0
    body = []
    for row in table.groups.itertuples(index=False):
        row = pd.Series(row._asdict())
        line = row_label_cells(table.groups, row)
        for label in labels:
            hit = frame[(frame.group == row.group) & (frame.column == label)]
            if hit.empty or pd.isna(hit["median"].iloc[0]):
                line.append(Cell("–"))
                continue
            cell = hit.iloc[0]
            line.append(Cell(fixed(cell["median"]), std="" if pd.isna(cell["std"]) else fixed(cell["std"]),
                             bold=bool(cell.best), warm=bool(cell.warm),
                             note=f"n={int(cell.n_seeds)}" if cell.n_seeds < max_seeds else ""))
        body.append(line)
    epochs = frame.groupby("column").epoch.agg(lambda e: "/".join(f"{v:g}" for v in sorted(set(e))))
    when = (f"epoch {epochs.iloc[0]}" if epochs.nunique() == 1 else
            "epoch " + ", ".join(f"{epochs[label]} on {label}" for label in labels if label in epochs))
    caption = ("How far each method gets by its first evaluation: the primary score at each run's first "
               f"evaluation ({when}), median over seeds ± std, in the results table's points. Bold: highest in "
               "the column (none where every row has the same score). Compare with the results table for where "
               "each run ends: a method that converges faster is further ahead here than there.")
    notes = ["‡ Started from the same method's MNLI run (init_from), as in the results table."] \
        if frame.warm.any() else []
    align = "l" * len(row_label_header(table.groups)) + "r" * len(labels)
    return Grid(caption, header, body, align, notes, "tab:first-evaluation")
