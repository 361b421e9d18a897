"""The end of a sweep: how this sitting's runs ended, and which did not end ok (with why, so it can be fixed).

The rows are the source of truth, not the launcher's return values, so the summary works with any sweeper and
launcher (`SweepSummary`, a Hydra callback in conf/config.yaml). Jobs that stopped before their run (a bad config or
environment: no row) leave their error beside their log (`record_job_error`), and the summary lists those too.
`job_failure` says what a launched job's return means, for the harness sweeper's count of failures.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness import rows
from harness.errors import HarnessError, RunBusy, RunFailed, SweepStopping

log = logging.getLogger(__name__)

JOB_ERROR_FILE = "error.txt"  # in a sweep job's log folder: why the job did not start (the summary lists it)


def sitting_rows(results_dir: str | Path, sweep_name: str, since: dt.datetime) -> pd.DataFrame:
    """The rows of sweep `sweep_name` written since `since` (this sitting), any status."""
    frame = rows.read_rows(Path(results_dir) / sweep_name)
    if frame.empty:
        return frame
    finished = frame["finished_at"].map(lambda s: dt.datetime.fromisoformat(s) if s else None)
    return frame[finished.map(lambda t: t is not None and t >= since)]


def format_summary(sweep_name: str, sitting: pd.DataFrame, total_ok: int,
                   job_errors: Sequence[tuple[str, str]] = ()) -> str:
    """How this sitting's runs ended, listing those that did not end ok, then the jobs that stopped before their
    run started (`job_errors`: (overrides, error) of a bad config or environment: no row)."""
    counts = sitting["status"].value_counts().to_dict() if len(sitting) else {}
    if len(sitting):
        text = (f"sweep {sweep_name}: {len(sitting)} runs finished in this sitting ("
                + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"); {total_ok} ok rows in the sweep")
    else:
        text = f"sweep {sweep_name}: no run finished in this sitting; {total_ok} ok rows in the sweep"
    failed = sitting[sitting["status"] != "ok"] if len(sitting) else sitting
    if len(failed):
        text += f"\n{len(failed)} runs did not end ok (re-running the same command retries them):"
        for row in failed.itertuples():
            rank = "" if pd.isna(row.rank) else f" r={int(row.rank)}"
            text += (f"\n  {row.status:<11} {row.run_key}  task={row.task} variant={row.variant}{rank} "
                     f"seed={row.seed}: {row.error}")
    if job_errors:
        text += f"\n{len(job_errors)} jobs did not start (no row; fix the config or environment, then re-run):"
        for overrides, error in job_errors:
            text += f"\n  {overrides}: {error}"
    return text


def record_job_error(folder: Path, overrides: list[str], err: Exception) -> None:
    """Write why a sweep job ended without an ok row (one line of overrides, one of error) beside its log, for
    `job_errors` to list at the end (harness/__main__.py calls it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JOB_ERROR_FILE).write_text(f"{' '.join(overrides)}\n{type(err).__name__}: {err}\n")
    except OSError:
        pass


def job_errors(sweep_dir: str | Path | None) -> list[tuple[str, str]]:
    """(overrides, error) of every job of this sitting that stopped before its run (record_job_error writes
    them into the job's log folder, which belongs to this sitting)."""
    if sweep_dir is None:
        return []
    found = []
    for path in sorted(Path(sweep_dir).glob(f"*/{JOB_ERROR_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        overrides, _, error = path.read_text().partition("\n")
        found.append((overrides, error.strip()))
    return found


def log_summary(results_dir: str | Path, sweep_name: str, since: dt.datetime,
                sweep_dir: str | Path | None = None) -> int:
    """Log how the runs written since `since` ended, listing those not ok and the jobs of `sweep_dir` that did not
    start; return how many were not ok."""
    sitting = sitting_rows(results_dir, sweep_name, since)
    all_rows = rows.read_rows(Path(results_dir) / sweep_name)
    total_ok = int((all_rows["status"] == "ok").sum()) if len(all_rows) else 0
    errors = job_errors(sweep_dir)
    not_ok = (int((sitting["status"] != "ok").sum()) if len(sitting) else 0) + len(errors)
    (log.warning if not_ok else log.info)(format_summary(sweep_name, sitting, total_ok, errors))
    return not_ok


class SweepSummary(Callback):
    """At the end of a multirun, log how the runs of this sitting ended and list those that did not end ok.

    Configured in conf/config.yaml under hydra.callbacks; works with any sweeper and launcher because it
    reads the rows (the results are the source of truth), not the launcher's return values. (The harness
    sweeper logs the same summary itself before exiting non-zero when runs failed; Hydra then skips this.)
    """

    def __init__(self) -> None:
        self.started: dt.datetime | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = sitting_start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.started is None or config.get("dry_run"):
            return
        log_summary(config.results_dir, config.sweep_name, self.started, config.hydra.sweep.dir)


def sitting_start() -> dt.datetime:
    """Now, to the second (rows record finished_at to the second)."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def job_failure(overrides: Sequence[str], job_return: JobReturn) -> BaseException | None:
    """The error of a launched job that counts as failed, logged as what it means, or None.

    None for a job that ran (whatever its row says: RunFailed is raised only after the row is written, and is
    counted) and for one that was not this sweep's to run: RunBusy (another process runs it) and SweepStopping (the
    sweep is stopping) are logged and left. A HarnessError other than RunFailed is a job that did not start (bad
    config or environment: no row); any other exception crashed before or after the row, which is a bug.
    """
    if job_return.status != JobStatus.FAILED:
        return None
    error = job_return._return_value  # the job's exception (return_value would re-raise it)
    if isinstance(error, (RunBusy, SweepStopping)):
        log.info("%s", error)
        return None
    if isinstance(error, HarnessError) and not isinstance(error, RunFailed):
        log.error("job %s did not start: %s", " ".join(overrides), error)
    elif not isinstance(error, RunFailed):
        log.error("job %s crashed without a result row: %s: %s", " ".join(overrides), type(error).__name__, error)
    return error
