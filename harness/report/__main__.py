"""python -m harness.report: write a report, or --check the committed one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import harness.report
from harness.errors import ReportError
from harness.report.build import check, write_report
from harness.report.rows import SELECTIONS, load
from harness.report.statistics import RESAMPLES, SEED
from harness.report.tables import inflation_table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report",
                                     description=harness.report.__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="results folders: results/<sweep> or a folder of sweeps")
    parser.add_argument("--out", help="where the report goes (default: <dir>/report; required for several dirs)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate the tables (with the same --selection) and exit 1 with a diff when the committed "
                             "ones differ")
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
            return 0 if check(args.dirs, args.out, args.resamples, args.seed, selection=args.selection) else 1
        out = write_report(args.dirs, args.out, not args.no_plots, args.resamples, args.seed, args.selection)
    except ReportError as err:
        print(f"harness.report: {err}", file=sys.stderr)
        return 2
    print(f"report written to {out}/ (README.md, table.md/.tex/.csv, efficiency.*, param_counts.*"
          + ("" if args.no_plots else ", plots/") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
