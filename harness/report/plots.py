"""The report's plots: score vs rank and vs parameters, efficiency, training curves, DyLoRA's rank curve."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import ReportError
from harness.report.labels import METRIC_LABELS, task_label, task_position, variant_label
from harness.report.render import byte_unit
from harness.report.rows import histories, ok_rows, rank_scores
from harness.report.tables import PaperTable, group_frame


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


def warm_or_only(groups: pd.DataFrame) -> pd.DataFrame:
    """The table's rows without the "(no warm start)" ones: a plot draws one series per variant (the tables
    show both)."""
    return groups[groups.start == ""] if "start" in groups else groups


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
    groups = warm_or_only(table.groups)
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
    groups = warm_or_only(table.groups)
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
    groups = warm_or_only(group_frame(ok_rows(rows)))
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
        finish_axes(axes[j], f"{task_label(task)}: validation", "optimizer step", primary_of(rows, task))
        finish_axes(axes[len(tasks) + j], f"{task_label(task)}: training", "optimizer step",
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
    groups = warm_or_only(group_frame(ok_rows(rows)))
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
        finish_axes(ax, f"{task_label(task)}: score by evaluated rank",
                    "rank used at evaluation (log scale)", primary_of(rows, task))
    fig.suptitle("DyLoRA: one adapter, scored at every rank up to the trained one, at the evaluation the results "
                 "table scores (median over seeds, bars: std)")
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
