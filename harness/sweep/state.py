"""What a sweep has done and who is doing what: each job's run_key and row status, and one lock per run.

* `job_states` / `format_listing`: the run_key of every job and whether its row already says `ok`, for
  `dry_run=true` (lists, runs nothing) and for skipping finished runs before anything is launched; that is how a
  sweep resumes (`todo_jobs` logs what is kept and returns the rest).
* `dependency_waves`: launch order, so that a run's init_from source has its row before the run reads it.
* `claim_run`: an exclusive lock per run_key, so two processes never run (and write) the same run. The lock file
  names its holder (`host:pid`), which is how the stop protocol (lifecycle.stop_workers) finds a worker's run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from harness import rows, run_keys
from harness.errors import ConfigError, RunBusy
from harness.sweep.grid import override_key

log = logging.getLogger(__name__)


# ---- which jobs are done ------------------------------------------------------------------------------
@dataclass
class JobState:
    overrides: list[str]
    run_key: str
    status: str  # a row's status (ok, failed, ...), "todo" without one, "rerun" for an ok one rerun=true runs again,
    #              "other weights" for an ok one made with other files at the model's path
    device: str | None = None  # where the row was measured (its speed and memory belong to that device)
    precision: str | None = None  # what the row computed in (`auto` is settled per machine)
    source: str | None = None  # run_key of the run this one starts from (init_from), if any
    has_adapter: bool = False  # its adapter file exists (what a run that starts from this one loads)

    @property
    def done(self) -> bool:
        return self.status == "ok"


def job_state(cfg: DictConfig, overrides: list[str]) -> JobState:
    """The run_key of a composed job config and the status of its row (`todo` without one)."""
    key = run_keys.run_key(cfg)
    row = rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, key))
    if row is None:
        return JobState(list(overrides), key, "todo")
    status = "nan" if row["status"] == "ok" and not rows.is_done(row) else row["status"]  # ok, with a NaN score
    if status == "ok" and cfg.get("rerun"):  # rerun=true: the job runs and replaces its ok row
        status = "rerun"
    elif status == "ok" and rows.made_with_other_weights(row, run_keys.model_fingerprint(cfg)):
        status = "other weights"  # the job runs again (run() says why) and replaces the row
    has_adapter = rows.adapter_file(cfg.results_dir, cfg.sweep_name, key) is not None
    return JobState(list(overrides), key, status, row.get("device"), row.get("precision"), has_adapter=has_adapter)


def job_states(jobs: Sequence[list[str]], compose: Callable[[list[str]], DictConfig]) -> list[JobState]:
    """`job_state` of every job; `compose(overrides)` builds a job's config as the launcher will. A job whose
    init_from names a task (`task=mnli`) gets the run_key of the job it names as an added `init_from=<key>`
    override, so its own key, and the run the launcher starts, include its source."""
    from harness import warm_start

    configs = [compose(job) for job in jobs]
    resolved = warm_start.resolve_among_jobs(configs)
    states = []
    for job, before, cfg in zip(jobs, configs, resolved):
        source = cfg.get("init_from")
        if source != before.get("init_from"):
            job = [o for o in job if override_key(o) != "init_from"] + [f"init_from={source}"]
        state = job_state(cfg, job)
        state.source = source
        states.append(state)
    return rerun_sources_without_adapter(states)


def rerun_sources_without_adapter(states: list[JobState]) -> list[JobState]:
    """A job's `ok` source whose adapter file is gone (git keeps rows, not adapters; or it ran with
    save_adapter=false) cannot be started from: while a job that needs it is still to run, the source becomes a job
    again (status `no_adapter`, with `rerun=true`, so it runs despite its ok row and replaces that row)."""
    needed = {s.source for s in states if s.source is not None and not s.done}
    for state in states:
        if state.done and state.run_key in needed and not state.has_adapter:
            log.info("run %s has an ok row but no adapter file, and a job starts from it: it runs again first",
                     state.run_key)
            state.status = "no_adapter"
            state.overrides = [o for o in state.overrides if override_key(o) != "rerun"] + ["rerun=true"]
    return states


def dependency_waves(states: Sequence[JobState]) -> list[list[JobState]]:
    """The jobs to run in launch order, cut into waves that run one after another, so that a source's row exists
    before a run reads it. The grid's order is kept (a source listed after its user moves ahead of it), and a wave
    ends only where the next job starts from a job of that wave: with seeds outermost, as the sweep files have them,
    a sitting that stops early still leaves whole seeds (each wave's end waits for its slowest job)."""
    pending = list(states)
    keys_pending = {s.run_key for s in pending}
    ordered: list[JobState] = []
    while pending:
        ready = next((s for s in pending if s.source not in keys_pending), None)
        if ready is None:
            raise ConfigError("init_from forms a cycle among these jobs: "
                              + ", ".join(f"{s.run_key} <- {s.source}" for s in pending))
        ordered.append(ready)
        pending.remove(ready)
        keys_pending.discard(ready.run_key)
    waves: list[list[JobState]] = [[]]
    in_wave: set[str] = set()
    for state in ordered:
        if state.source in in_wave:
            waves.append([])
            in_wave = set()
        waves[-1].append(state)
        in_wave.add(state.run_key)
    return [wave for wave in waves if wave]


def format_listing(sweep_name: str, states: Sequence[JobState], other_rows: int = 0) -> str:
    """The dry-run table: a count per status, the overrides every job shares, then one line per job
    (number, status, run_key, its own overrides), tab-separated so it parses (`cut -f3` gives run_keys).
    `other_rows`: rows in the sweep's folder that belong to none of these jobs (jobs the command line narrowed
    away, or an earlier config)."""
    counts: dict[str, int] = {}
    for state in states:
        counts[state.status] = counts.get(state.status, 0) + 1
    todo = sum(1 for s in states if not s.done)
    common = [o for o in states[0].overrides if all(o in s.overrides for s in states)] if len(states) > 1 else []
    lines = [f"# sweep {sweep_name}: {len(states)} jobs, {counts.get('ok', 0)} done (ok), {todo} to run"
             + "".join(f", {n} {status}" for status, n in sorted(counts.items()) if status != "ok"),
             f"# every job: {' '.join(common)}" if common else "# every job: (no common overrides)"]
    if other_rows:
        lines.append(f"# {other_rows} rows in the sweep's runs/ folder belong to none of these jobs (jobs the "
                     "command line left out, or an earlier config); reports read every row there")
    lines.append("# job\tstatus\trun_key\toverrides")
    lines += [f"{i}\t{s.status}\t{s.run_key}\t{' '.join(o for o in s.overrides if o not in common)}"
              for i, s in enumerate(states)]
    return "\n".join(lines)


def other_rows(results_dir: str | Path, sweep_name: str, states: Sequence[JobState]) -> int:
    """How many rows of the sweep's folder belong to none of `states` (other jobs' rows, or an earlier config's)."""
    keys = {s.run_key for s in states}
    return sum(1 for p in rows.runs_dir(results_dir, sweep_name).glob("*.parquet") if p.stem not in keys)


def todo_jobs(sweep_name: str, states: Sequence[JobState]) -> list[JobState]:
    """The jobs still to run (no `ok` row), after logging each one kept and where the kept rows were measured."""
    for state in states:
        if state.done:
            log.info("skip run %s (%s): it already has an ok row", state.run_key, " ".join(state.overrides))
    todo = [s for s in states if not s.done]
    log.info("sweep %s: %d jobs, %d already done, %d to run", sweep_name, len(states), len(states) - len(todo),
             len(todo))
    kept_from = sorted({str(s.device) for s in states if s.done})
    computed_in = sorted({str(s.precision) for s in states if s.done})
    if kept_from:  # the launcher may run jobs elsewhere (a cluster), so this process cannot judge a mismatch
        log.info("the %d rows kept were measured on: %s, computed in %s (their speed and memory belong there, "
                 "and precision=auto may settle otherwise where the jobs to run land; the report refuses a cell "
                 "whose seeds computed in two precisions; to measure elsewhere, use another sweep_name)",
                 len(states) - len(todo), ", ".join(kept_from), ", ".join(computed_in))
    return todo


# ---- one process per run -------------------------------------------------------------------------------
def lock_path(cfg: DictConfig, key: str) -> Path:
    return run_lock(cfg.results_dir, cfg.sweep_name, key)


def run_lock(results_dir: str | Path, sweep_name: str, key: str) -> Path:
    return Path(results_dir) / sweep_name / ".locks" / f"{key}.lock"


def lock_holder(path: Path) -> str | None:
    """`host:pid` of the process running the run whose lock this is (claim_run writes it; "" while it is
    being written), or None when no process holds the lock now."""
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip()
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


@contextlib.contextmanager
def claim_run(cfg: DictConfig, key: str) -> Iterator[None]:
    """Hold an exclusive lock on run `key` for the duration, or raise RunBusy if another process has it.

    flock, not a marker file: the kernel releases it when the holder dies (even by SIGKILL), so a killed
    sweep leaves no stale claim; it also works between machines on NFS (Linux emulates it with fcntl locks).
    """
    path = lock_path(cfg, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"run {key} is being run by another process right now (lock {path}); "
                          "this job leaves it to that process") from None
        handle.truncate(0)
        handle.write(f"{socket.gethostname()}:{os.getpid()}")  # who runs it: lifecycle.stop_workers signals it
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
