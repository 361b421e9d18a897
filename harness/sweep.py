"""Sweeps: which jobs a grid expands to, which of them are done, and what each job may use of the machine.

`python -m harness +sweep=<name>` composes conf/sweep/<name>.yaml, whose `hydra.sweeper` is the `harness`
sweeper (hydra_plugins/harness_sweeper, a thin shell around this module). This module holds the logic so
that it can be read and tested without Hydra's plugin machinery:

* `expand_jobs`: the Cartesian product of the sweep's params, exactly as Hydra's basic sweeper builds it,
  except that the rank params are left out for rank-free variants (registry class with `uses_rank = False`:
  full, head, bitfit), so those run once per task x seed instead of once per rank; plus extra overrides
  for the jobs with a given choice (`when`: a paper's own recipe for one variant, a per-task budget).
* `job_states` / `format_listing`: the run_key of every job and whether its row already says `ok`, for
  `dry_run=true` (lists, runs nothing) and for skipping finished runs before anything is launched.
* `claim_run`: an exclusive lock per run_key, so two processes never run (and write) the same run.
* `stop_workers`: on SIGTERM to a parallel sweep, the workers' runs write their `interrupted` rows first.
* `configure_resources`: torch threads per job (jobs x threads <= cores) and, with several local jobs
  on a multi-GPU machine, one GPU per job through CUDA_VISIBLE_DEVICES, set before CUDA is initialised.
* `SweepSummary` / `log_summary`: at the end, the runs of this sitting that did not end `ok`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness import results
from harness.errors import ConfigError, HarnessError

log = logging.getLogger(__name__)

VARIANT_KEY = "variant"


class RunBusy(HarnessError):
    """Another process holds this run's lock: it is running the same config right now."""


class RunFailed(HarnessError):
    """The run ended with a status other than ok; its row (with status and error) is written."""


# ---- the grid ------------------------------------------------------------------------------------------
def uses_rank(variant: str) -> bool:
    """Whether `variant` has a rank to sweep, from its registry class (the single source of truth)."""
    from harness.adapters import VARIANTS  # imports torch: only when a sweep is expanded

    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r} in the sweep is not registered; registered variants: "
                          f"{', '.join(sorted(VARIANTS))} (each needs harness/adapters/<file>.py and "
                          "conf/variant/<name>.yaml)")
    return bool(VARIANTS[variant].uses_rank)


def override_key(override: str) -> str:
    """`+variant.r=4` -> `variant.r`: the config key an override string sets (prefixes +, ++, ~ dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def expand_jobs(grid: Sequence[Sequence[str]], default_variant: str, rank_params: Sequence[str],
                when: dict[str, Sequence[str]] | None = None,
                rank_used: Callable[[str], bool] = uses_rank,
                declared: Sequence[Sequence[str]] = (),
                command_line: Sequence[str] = ()) -> list[list[str]]:
    """The jobs (override lists) of a sweep, from the full Cartesian product `grid` of its params.

    For a rank-free variant the overrides of `rank_params` are dropped, so the product over ranks collapses
    to one job per remaining combination (kept at its first position, order otherwise unchanged). Then, for
    each `when` entry `"key=value": [overrides]` (in order) whose choice the job has, those overrides are
    added, replacing any earlier override of the same key: a paper's own recipe for one variant, or a
    per-task step budget. A key the user set on the `command_line` (overrides as typed) is never replaced:
    `+sweep=cpu_glue train.epochs=5` trains 5 epochs everywhere, whatever the file's `when` says.
    An entry is a typo, and an error, when no job chose its value and the sweep file's
    own grid (`declared`, its params before command-line narrowing) does not list it either, or when it names
    an unregistered variant; a file narrowed on the command line (`+sweep=cpu_glue task=mrpc`) keeps its
    entries for the tasks it no longer runs.
    """
    when = {condition: list(extra) for condition, extra in (when or {}).items()}
    for condition in when:
        key, sep, value = condition.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"hydra.sweeper.when key {condition!r} is not a choice; write it as key=value, "
                              "e.g. variant=full or task=rte")
        if key == VARIANT_KEY:
            rank_used(value)  # an unknown variant here is a typo: fail now, naming the registered ones
    rank_keys = set(rank_params)
    pinned = {override_key(o) for o in command_line}
    known = {override_key(o) + "=" + o.partition("=")[2] for point in declared for o in point}
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for point in grid:
        choices = {override_key(o): o.partition("=")[2] for o in point}
        choices.setdefault(VARIANT_KEY, default_variant)
        known.update(f"{key}={value}" for key, value in choices.items())
        job = [o for o in point if rank_used(choices[VARIANT_KEY]) or override_key(o) not in rank_keys]
        for condition, extra in when.items():
            key, _, value = condition.partition("=")
            if choices.get(key) == value:
                extra = [o for o in extra if override_key(o) not in pinned]
                extra_keys = {override_key(o) for o in extra}
                job = [o for o in job if override_key(o) not in extra_keys] + extra
        if tuple(job) not in seen:
            seen.add(tuple(job))
            jobs.append(job)
    unknown = [c for c in when if c not in known]
    if unknown:
        raise ConfigError(f"hydra.sweeper.when {unknown}: neither the sweep's params nor the command line choose "
                          f"that; each entry must be one of their choices: {', '.join(sorted(known))}")
    return jobs


# ---- which jobs are done -------------------------------------------------------------------------------
@dataclass
class JobState:
    overrides: list[str]
    run_key: str
    status: str  # a row's status (ok, failed, ...) or "todo" when the run has no row yet
    device: str | None = None  # where the row was measured (its speed and memory belong to that device)
    source: str | None = None  # run_key of the run this one starts from (init_from), if any

    @property
    def done(self) -> bool:
        return self.status == "ok"


def job_state(cfg: DictConfig, overrides: list[str]) -> JobState:
    """The run_key of a composed job config and the status of its row (`todo` without one)."""
    key = results.run_key(cfg)
    row = results.read_row(results.row_path(cfg.results_dir, cfg.sweep_name, key))
    if row is None:
        return JobState(list(overrides), key, "todo")
    status = "nan" if row["status"] == "ok" and not results.is_done(row) else row["status"]  # ok, with a NaN score
    return JobState(list(overrides), key, status, row.get("device"))


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
    return states


def dependency_waves(states: Sequence[JobState]) -> list[list[JobState]]:
    """The jobs to run in launch order: first those whose init_from source is not among them, then those that start
    from a job of the first wave, and so on, so that a source's row exists before a run reads it."""
    pending = list(states)
    keys_pending = {s.run_key for s in pending}
    waves: list[list[JobState]] = []
    while pending:
        wave = [s for s in pending if s.source not in keys_pending]
        if not wave:
            raise ConfigError("init_from forms a cycle among these jobs: "
                              + ", ".join(f"{s.run_key} <- {s.source}" for s in pending))
        waves.append(wave)
        pending = [s for s in pending if s not in wave]
        keys_pending = {s.run_key for s in pending}
    return waves


def format_listing(sweep_name: str, states: Sequence[JobState], other_rows: int = 0) -> str:
    """The dry-run table: a count per status, the overrides every job shares, then one line per job
    (number, status, run_key, its own overrides), tab-separated so it parses (`cut -f3` gives run_keys).
    `other_rows`: rows in the sweep's folder that belong to none of these jobs (made by an earlier config)."""
    counts: dict[str, int] = {}
    for state in states:
        counts[state.status] = counts.get(state.status, 0) + 1
    todo = sum(1 for s in states if not s.done)
    common = [o for o in states[0].overrides if all(o in s.overrides for s in states)] if len(states) > 1 else []
    lines = [f"# sweep {sweep_name}: {len(states)} jobs, {counts.get('ok', 0)} done (ok), {todo} to run"
             + "".join(f", {n} {status}" for status, n in sorted(counts.items()) if status != "ok"),
             f"# every job: {' '.join(common)}" if common else "# every job: (no common overrides)"]
    if other_rows:
        lines.append(f"# {other_rows} rows in the sweep's runs/ folder belong to none of these jobs (an earlier "
                     "config); reports read every row there")
    lines.append("# job\tstatus\trun_key\toverrides")
    lines += [f"{i}\t{s.status}\t{s.run_key}\t{' '.join(o for o in s.overrides if o not in common)}"
              for i, s in enumerate(states)]
    return "\n".join(lines)


def other_rows(results_dir: str | Path, sweep_name: str, states: Sequence[JobState]) -> int:
    """How many rows of the sweep's folder belong to none of `states` (rows of an earlier config)."""
    keys = {s.run_key for s in states}
    return sum(1 for p in results.runs_dir(results_dir, sweep_name).glob("*.parquet") if p.stem not in keys)


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


# ---- stopping a sweep: SIGTERM / SIGINT -------------------------------------------------------------------
# The sweep's own process sets HARNESS_SWEEP_PID, which its local workers and submitit jobs inherit. A run
# interrupted in the sweep's process stops the sweep (SystemExit); one interrupted in another process fails
# as a job (its row says `interrupted`), so the worker lives on to report it and the launcher keeps its pool
# intact while the other workers write their rows.
SWEEP_PID = "HARNESS_SWEEP_PID"
_stopping = False


class SweepStopping(HarnessError):
    """This worker was told to stop (SIGTERM/SIGINT): it starts no further run."""


def in_sweep_process() -> bool:
    return os.environ.get(SWEEP_PID) in (None, str(os.getpid()))


def mark_stopping(signum: int | None = None, frame: Any = None) -> None:
    global _stopping
    _stopping = True


def stopping() -> bool:
    return _stopping


def is_descendant(pid: int) -> bool:
    """Whether process `pid` was started by this one, directly or not (Linux /proc; False where it cannot tell)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent's pid
        if pid == os.getpid():
            return True
    return False


def stop_workers(results_dir: str | Path, sweep_name: str, keys: Sequence[str], grace_s: float = 30.0) -> None:
    """SIGTERM to the local worker processes running one of the runs `keys` (the pids in their locks), so
    each writes its `interrupted` row, then wait (at most `grace_s`) until those runs have let go of their
    locks. Only this process's own workers that hold a run are told: an idle loky worker would die of
    SIGTERM, and loky then SIGKILLs the whole pool, rows half-way included; another sweep's runs go on.
    """
    told = []
    for lock in (run_lock(results_dir, sweep_name, key) for key in keys):
        host, _, pid = (lock_holder(lock) or "").rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and is_descendant(int(pid)):  # ours, not another sweep's
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
                told.append(lock)
    deadline = time.monotonic() + grace_s
    while told and time.monotonic() < deadline:
        told = [lock for lock in told if lock_holder(lock) is not None]
        time.sleep(0.1)


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
        handle.write(f"{socket.gethostname()}:{os.getpid()}")  # who runs it: stop_workers signals this process
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- resources per job ---------------------------------------------------------------------------------
def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_parallel_jobs(launcher: DictConfig, cores: int) -> int:
    """How many jobs the launcher runs at once on this machine (1 for the basic launcher and for SLURM,
    where each job has its own allocation)."""
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        n_jobs = launcher.get("n_jobs") or 1
        return max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)  # joblib: -1 = all cores, -2 = all but one
    return 1


def torch_threads(launcher: DictConfig, cores: int) -> int | None:
    """Threads for this job's torch ops, so that jobs x threads <= cores; None keeps torch's default.

    HARNESS_THREADS in the environment wins. joblib: cores // n_jobs. submitit (SLURM or local): the
    job's cpus_per_task (SLURM's default allocation is one CPU per task). Basic launcher: torch's default.
    """
    if os.environ.get("HARNESS_THREADS"):
        return int(os.environ["HARNESS_THREADS"])
    target = str(launcher.get("_target_", ""))
    if "JoblibLauncher" in target:
        return max(1, cores // local_parallel_jobs(launcher, cores))
    if "submitit" in target.lower():
        return int(launcher.get("cpus_per_task") or 1)
    return None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, found without initialising CUDA (which would freeze the choice).

    CUDA_VISIBLE_DEVICES when set (a SLURM allocation, or the user's choice), else one per GPU the NVIDIA
    driver lists in /proc (or `nvidia-smi -L`), as indices 0..n-1.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(i) for i in range(len(list(proc.iterdir())))]
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(l for l in listing.splitlines() if l.startswith("GPU "))]
    return []


def claim_gpu(devices: Sequence[str], lock_dir: Path, start: int = 0) -> tuple[str, Any] | None:
    """(device, open lock file) for the first device from `start` (cyclically) no other process holds."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for offset in range(len(devices)):
        device = devices[(start + offset) % len(devices)]
        handle = open(lock_dir / f"gpu-{device}.lock", "a")  # noqa: SIM115 - kept open while the GPU is ours
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return device, handle
    return None


_pinned_gpu: tuple[str, Any] | None = None  # held for the life of the process (joblib reuses its workers)


def pin_gpu(parallel_jobs: int, job_num: int, lock_dir: Path | None = None) -> str | None:
    """With several jobs at once on a multi-GPU machine, give this process a GPU of its own.

    Sets CUDA_VISIBLE_DEVICES to one device before CUDA is initialised. The device is locked (flock, in
    a per-user temp folder) for the life of the process, because a joblib worker runs many jobs and CUDA
    cannot change devices once initialised; the next job of the same worker keeps the same GPU. With more
    parallel jobs than GPUs, the extra jobs share device (job_num % GPUs).
    """
    global _pinned_gpu
    if _pinned_gpu is not None:
        return _pinned_gpu[0]
    if parallel_jobs <= 1:
        return None
    import torch

    if torch.cuda.is_initialized():
        log.warning("CUDA is already initialised in this process; cannot give it a GPU of its own")
        return None
    devices = visible_gpus()
    if len(devices) <= 1:
        return None
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"harness-gpus-{os.getuid()}"
    claimed = claim_gpu(devices, lock_dir, start=job_num % len(devices))
    if claimed is None:
        device = devices[job_num % len(devices)]
        log.warning("%d parallel jobs but %d GPUs: every GPU is taken, this job shares GPU %s",
                    parallel_jobs, len(devices), device)
    else:
        _pinned_gpu = claimed
        device = claimed[0]
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    log.info("local parallel job %d: CUDA_VISIBLE_DEVICES=%s", job_num, device)
    return device


def restore_start_method() -> None:
    """Give DataLoader workers the platform's multiprocessing start method back inside a joblib worker.

    A loky (joblib) worker makes `loky` the default start method, and loky's Popen cannot start a plain
    multiprocessing.Process: with train.num_workers > 0 every DataLoader fails with "AttributeError:
    'Process' object has no attribute 'env'". The first of get_all_start_methods() is the platform default.
    """
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def configure_resources(launcher: DictConfig, job_num: int) -> None:
    """Threads, GPU and DataLoader start method for the job about to run in this process.

    Call before any CUDA work: CUDA_VISIBLE_DEVICES is read once, when CUDA is initialised.
    """
    import torch

    restore_start_method()

    cores = available_cores()
    threads = torch_threads(launcher, cores)
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch threads: %d (%d cores, %d local jobs at once)", threads, cores,
                 local_parallel_jobs(launcher, cores))
    pin_gpu(local_parallel_jobs(launcher, cores), job_num)
    if not in_sweep_process():  # a worker: a signal between runs must not kill it (loky would then kill them all)
        with contextlib.suppress(ValueError):  # not the main thread
            for number in (signal.SIGTERM, signal.SIGINT):
                signal.signal(number, mark_stopping)


# ---- the summary at the end -----------------------------------------------------------------------------
def sitting_rows(results_dir: str | Path, sweep_name: str, since: dt.datetime) -> pd.DataFrame:
    """The rows of sweep `sweep_name` written since `since` (this sitting), any status."""
    rows = results.read_rows(Path(results_dir) / sweep_name)
    if rows.empty:
        return rows
    finished = rows["finished_at"].map(lambda s: dt.datetime.fromisoformat(s) if s else None)
    return rows[finished.map(lambda t: t is not None and t >= since)]


def format_summary(sweep_name: str, rows: pd.DataFrame, total_ok: int,
                   job_errors: Sequence[tuple[str, str]] = ()) -> str:
    """How this sitting's runs ended, listing those that did not end ok, then the jobs that stopped before their
    run started (`job_errors`: (overrides, error) of a bad config or environment: no row)."""
    counts = rows["status"].value_counts().to_dict() if len(rows) else {}
    if len(rows):
        text = (f"sweep {sweep_name}: {len(rows)} runs finished in this sitting ("
                + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"); {total_ok} ok rows in the sweep")
    else:
        text = f"sweep {sweep_name}: no run finished in this sitting; {total_ok} ok rows in the sweep"
    failed = rows[rows["status"] != "ok"] if len(rows) else rows
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


def job_errors(sweep_dir: str | Path | None) -> list[tuple[str, str]]:
    """(overrides, error) of every job of this sitting that stopped before its run (harness/__main__.py writes
    them into the job's log folder, which belongs to this sitting)."""
    if sweep_dir is None:
        return []
    found = []
    for path in sorted(Path(sweep_dir).glob("*/error.txt"), key=lambda p: (len(p.parent.name), p.parent.name)):
        overrides, _, error = path.read_text().partition("\n")
        found.append((overrides, error.strip()))
    return found


def log_summary(results_dir: str | Path, sweep_name: str, since: dt.datetime,
                sweep_dir: str | Path | None = None) -> int:
    """Log how the runs written since `since` ended, listing those not ok and the jobs of `sweep_dir` that did not
    start; return how many were not ok."""
    rows = sitting_rows(results_dir, sweep_name, since)
    all_rows = results.read_rows(Path(results_dir) / sweep_name)
    total_ok = int((all_rows["status"] == "ok").sum()) if len(all_rows) else 0
    errors = job_errors(sweep_dir)
    not_ok = (int((rows["status"] != "ok").sum()) if len(rows) else 0) + len(errors)
    (log.warning if not_ok else log.info)(format_summary(sweep_name, rows, total_ok, errors))
    return not_ok


class SweepsFailed(HarnessError):
    """Some runs of the sweep did not end ok (each has its row and is listed in the summary above)."""


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
