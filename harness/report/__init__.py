"""The report: the paper-style results table, which differences are real, efficiency, parameter counts, plots.

    python -m harness.report results/cpu_glue            # writes results/cpu_glue/report/
    python -m harness.report results/cpu_glue --check    # regenerate the tables, fail with a diff if they changed
    python -m harness.report results/cpu_glue --selection last   # score runs at their last evaluation
    python -m harness.report results/cpu_glue --inflation        # points eval_best adds over last, per variant

Reads every row under the given results folders (`<dir>/runs/*.parquet` or `<dir>/<sweep>/runs/*.parquet`)
and writes next to them (`<dir>/report/`, or `--out`):

  table.md / .tex / .csv          the LoRA paper's Table 2 for our rows: one row per variant (and rank, and
                                  implementation when peft rows exist), trainable parameters without the head,
                                  one column per task's metric, the average; median over seeds ± std, best
                                  in bold, variants a paired bootstrap cannot tell from the best underlined
  comparison.md / .tex / .csv     each row minus LoRA per column, with its paired-bootstrap interval, and
                                  the majority class (the no-skill baseline) against LoRA the same way
  first_evaluation.md/.tex/.csv   each row's score at its first evaluation (how fast it gets there)
  efficiency.md / .tex / .csv     throughput, measured peak memory, the exact memory account, adapter size
  param_counts.md / .tex / .csv   our trainable-parameter counts of roberta-base/large next to the papers'
  plots/*.png, plots/*.svg        score vs rank, score vs parameters (Pareto front), efficiency, training
                                  curves, DyLoRA's rank curve
  README.md                       all of the above on one page

Only `ok` rows enter the tables; the others are listed under the results table. Cells with a degenerate run
(constant predictions) are marked °; a column where every run is degenerate is greyed out and left out of Avg.
Cells whose runs started from another run's adapter (init_from) are marked ‡; a method's runs without that warm
start, reported beside warm ones, get a row of their own, "(no warm start)".
Everything is a function of the committed rows (and, for parameter counts, of the code) and is deterministic,
so `--check` can regenerate the text outputs in CI and compare them byte for byte. The notebook
notebooks/compare_variants.ipynb calls the same functions (`load`, `select`, `paper_table`, ...).

The modules, in the order a report is made:
  rows         load the rows, select some, the ok ones and the failures; saved predictions and histories
  statistics   the paired bootstrap that marks which rows the best one cannot be told from
  tables       the numbers of the results table, the efficiency table and the parameter counts
  render       those tables as Markdown, LaTeX and CSV
  comparison   each method against LoRA, and the first-evaluation (convergence) table
  plots        the figures
  build        every output at once: write them (write_report) or compare them with the committed ones (check)
  __main__     the command line
"""

from harness.errors import ReportError
from harness.report.build import build, check, default_out, index_page, write_report
from harness.report.comparison import against_reference, comparison_grid, first_evaluation_grid, first_evaluations
from harness.report.labels import (COLUMN_LABELS, COMPANIONS, EXTRAS, METRIC_LABELS, TASK_ORDER, VARIANT_ORDER,
                                   column_label, config_labels, task_label, task_position, variant_label)
from harness.report.plots import (pareto_front, planned_plots, plot_efficiency, plot_rank_curve, plot_score_vs_params,
                                  plot_score_vs_rank, plot_training_curves, save_figure)
from harness.report.render import (Cell, Grid, csv_text, efficiency_grid, fixed, format_count, format_sig, latex,
                                   markdown, param_count_grid, results_csv, results_grid)
from harness.report.rows import (SELECTIONS, apply_selection, degenerate_at, failures, group_key,
                                 histories, load, ok_rows, rank_scores, read_predictions, select)
from harness.report.statistics import LEVEL, RESAMPLES, SEED, paired_bootstrap, resampled_metric
from harness.report.tables import (Column, PaperTable, budget_warnings, efficiency_frame, inflation_table, paper_table,
                                   param_count_frame, published_params, table_columns)

__all__ = [
    "COLUMN_LABELS", "COMPANIONS", "EXTRAS", "LEVEL", "METRIC_LABELS", "RESAMPLES", "SEED", "TASK_ORDER",
    "SELECTIONS", "VARIANT_ORDER", "apply_selection", "budget_warnings", "degenerate_at", "inflation_table",
    "Cell", "Column", "Grid", "PaperTable", "ReportError", "against_reference", "build", "check", "column_label",
    "comparison_grid", "first_evaluation_grid", "first_evaluations",
    "config_labels", "csv_text", "default_out", "efficiency_frame", "efficiency_grid", "failures", "fixed",
    "format_count", "format_sig", "group_key", "histories", "index_page", "latex", "load", "markdown", "ok_rows",
    "paired_bootstrap", "paper_table", "param_count_frame", "param_count_grid", "pareto_front", "planned_plots",
    "plot_efficiency", "plot_rank_curve", "plot_score_vs_params", "plot_score_vs_rank", "plot_training_curves",
    "published_params", "rank_scores", "read_predictions", "resampled_metric", "results_csv", "results_grid",
    "save_figure", "select", "table_columns", "task_label", "task_position", "variant_label", "write_report"
]
