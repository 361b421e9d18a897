"""The stop protocol: what SIGTERM and SIGINT (Ctrl-C, `kill`, a cluster's preemption) do to a run and to a sweep.

This is the only module that installs signal handlers (a test greps the tree for it), so what a stop signal does is
read here, in one place. What it does depends on where it lands:

* **in a run.** harness/__main__.py runs `run()` inside `run_guard()`. `run()` installs nothing; it only marks
  where it may be cut:
  - while it trains (`interruptible()`), the signal raises `Interrupted`: run() writes the `interrupted` row, and
    every later signal is ignored in that process, so a group kill or a second Ctrl-C cannot cut the row short;
  - while a finished run writes its row (`stops_held()`), the signal waits until the row is written.
  Elsewhere, the signal meets the handler that was there before the guard (below).
* **in a worker between runs** (joblib or submitit, `stop_between_runs()`): it only marks the process as stopping.
  The worker survives (loky kills its whole pool when one worker dies, rows half-way included), lets the launcher
  collect its result and starts no further run (`sweep_stopping()`).
* **in the sweep's own process** (`sweep_guard()`, around the harness sweeper's launches): the local workers that
  hold a run are told first (`stop_workers`, through the run locks) and write their `interrupted` rows; then the
  sweep stops as on Ctrl-C (a parallel launcher stops its workers) and exits 130.
* **after an interrupted run** (`end_interrupted_job()`): a preempted SLURM job requeues itself (harness/sweep/slurm.py)
  and one at its time limit fails; in the sweep's own process the run's exit stops the sweep (128 + signum); in a
  worker the job fails (its row says why) and the worker starts no further run, while the sweep's process stops the
  sweep.

The marks `interruptible()` and `stops_held()` are plain flags: without a guard (a test or a notebook calling
`run()`), a stop signal does what Python does by default, and Ctrl-C's KeyboardInterrupt still leaves an
`interrupted` row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from harness.errors import Interrupted, RunFailed
from harness.sweep import slurm
from harness.sweep.state import lock_holder, run_lock

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

SWEEP_PID = "HARNESS_SWEEP_PID"
"""Environment variable: the pid of the sweep's own process, set by `sweep_guard()`.

An environment variable because the knowledge must cross processes: joblib's workers and submitit's jobs inherit
it, and no Python object reaches them. A run interrupted in the process it names stops the sweep (SystemExit); one
interrupted anywhere else fails as a job, so that its worker lives on to report it. Unset, the process is a single
run (or a sweep under another sweeper) and counts as the sweep's own."""


@dataclass
class _Process:
    """What this process knows of stopping. Per process by nature (signals are delivered to a process), so it is
    module state, but only this module reads or writes it."""

    stopping: bool = False              # told to stop: start no further run
    outer: dict[int, Any] | None = None  # while run_guard is installed: the handlers it replaced
    phase: str = "outside"              # where a guarded run is: "outside", "interruptible" or "held"
    held: list[int] = field(default_factory=list)  # signals that arrived while stops were held


_process = _Process()


# ---- where this process stands -----------------------------------------------------------------------------
def in_sweep_process() -> bool:
    """Whether this process is the sweep's own (or a single run), not a launcher's worker or job."""
    return os.environ.get(SWEEP_PID) in (None, str(os.getpid()))


def sweep_stopping() -> bool:
    """Whether this process was told to stop (SIGTERM/SIGINT): a job about to start must not start its run."""
    return _process.stopping


def in_submitit_slurm_job() -> bool:
    """Whether this process is a SLURM job that submitit started for a sweep (not a user's own sbatch, and not a
    submitit_local sweep running inside a SLURM allocation)."""
    return slurm.submitit_slurm_job() and not in_sweep_process()


# ---- a job's process, before and after its run -------------------------------------------------------------
def _mark_stopping(signum: int | None = None, frame: Any = None) -> None:
    _process.stopping = True


def _warn_time_limit(signum: int, frame: Any) -> None:
    log.warning("SLURM job %s: SIGUSR2, its time limit is near; the run goes on until SLURM stops it "
                "(a run cannot checkpoint mid-training: raise hydra.launcher.timeout_min if it is cut)",
                slurm.slurm_job_id())


def stop_between_runs() -> None:
    """Before a job's run: what a signal does to this process while no run is cut by it.

    In a launcher's worker, SIGTERM/SIGINT only mark it as stopping (a dead loky worker would take the whole pool,
    rows half-way included). In a SLURM job run by submitit, its SIGUSR2 (sent `signal_delay_s` before the time limit,
    for jobs that can checkpoint) would end the run as `failed` half-way; a run cannot checkpoint, so it is logged.
    """
    with contextlib.suppress(ValueError):  # not the main thread: Python cannot catch signals there anyway
        if not in_sweep_process():
            for number in STOP_SIGNALS:
                signal.signal(number, _mark_stopping)
        if in_submitit_slurm_job():
            signal.signal(signal.SIGUSR2, _warn_time_limit)


def end_interrupted_job(err: Interrupted, key: str) -> NoReturn:
    """After run `key` was interrupted (its row says so): end this job, and with it the sweep.

    A preempted SLURM job requeues itself and exits without a result (the sweep waits for the requeued attempt);
    one at its time limit, or cancelled, fails as a job. Otherwise this process starts no further run: the sweep's
    own process exits (128 + signum, as the shell reports a signal), and a worker fails its job with RunFailed.
    """
    log.warning("stopping: %s", err)
    if in_submitit_slurm_job():
        again, why = slurm.requeue_interrupted_slurm_job()
        log.warning("%s", why)
        if again:  # no result for this attempt: the sweep waits for the requeued one
            raise SystemExit(128 + err.signum) from err
        raise RunFailed(f"run {key} interrupted ({err}); {why}") from err
    _mark_stopping()
    if in_sweep_process():
        raise SystemExit(128 + err.signum) from err
    raise RunFailed(f"run {key} interrupted ({err}); its row says so") from err


# ---- a run -------------------------------------------------------------------------------------------------
def _on_stop_signal(signum: int, frame: Any) -> None:
    """run_guard's handler: what a stop signal does depends on where the run is (see the module's docstring)."""
    if _process.phase == "held":
        _process.held.append(signum)
        return
    if _process.phase == "interruptible":
        for number in STOP_SIGNALS:  # for good: this process is stopping, and its row must be written whole
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(f"received {signal.Signals(signum).name}", signum)
    outer = (_process.outer or {}).get(signum, signal.SIG_DFL)
    if callable(outer):
        outer(signum, frame)
    elif outer != signal.SIG_IGN:  # the default action (SIGTERM's: end the process), exactly as without the guard
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


@contextlib.contextmanager
def run_guard() -> Iterator[None]:
    """Around a call of `run()`: stop signals cut the run while it is `interruptible()`, wait while it holds them
    (`stops_held()`), and meet the handlers from before the guard anywhere else. After an interruption both signals
    stay ignored in this process (it is stopping); otherwise the earlier handlers are put back."""
    try:
        outer = {number: signal.signal(number, _on_stop_signal) for number in STOP_SIGNALS}
    except ValueError:  # not the main thread (e.g. a thread-based launcher): leave signals alone
        yield
        return
    _process.outer = outer
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_stop_signal:  # not interrupted: put back what was there
            for number, handler in outer.items():
                signal.signal(number, handler)
        _process.outer = None


@contextlib.contextmanager
def _phase(phase: str) -> Iterator[None]:
    before, _process.phase = _process.phase, phase
    try:
        yield
    finally:
        _process.phase = before


def interruptible() -> contextlib.AbstractContextManager[None]:
    """Marks the part of a run a stop signal may cut (setup and training): under run_guard, the signal raises
    Interrupted there, so that the run writes its `interrupted` row. A flag; it installs nothing."""
    return _phase("interruptible")


@contextlib.contextmanager
def stops_held() -> Iterator[None]:
    """Marks a part of a run no stop signal may cut (writing a finished run's row): under run_guard, a signal
    arriving in it is delivered at its end, to the handler from before the guard."""
    _process.held.clear()
    try:
        with _phase("held"):
            yield
    finally:
        held, _process.held = _process.held, []
        for number in dict.fromkeys(held):
            signal.raise_signal(number)  # the phase is over: _on_stop_signal passes it on


# ---- the sweep's own process -------------------------------------------------------------------------------
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
def sweep_guard(results_dir: str | Path, sweep_name: str, keys: Sequence[str]) -> Iterator[None]:
    """Around the harness sweeper's launches, in the sweep's own process.

    Names this process in SWEEP_PID for its workers and jobs. SIGTERM or SIGINT then tells the local workers that
    hold one of the runs `keys` first (stop_workers: they write their `interrupted` rows), and stops the sweep as
    Ctrl-C does, so that a parallel launcher stops its workers (joblib's would otherwise be orphaned, still running):
    SystemExit(130), the same command continues it. A run in this process (basic launcher) handles the signal
    itself (run_guard: its row, then SystemExit).
    """
    os.environ[SWEEP_PID] = str(os.getpid())

    def stop(signum: int, frame: Any) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)  # once: a second signal must not start this again
        stop_workers(results_dir, sweep_name, keys)
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        log.warning("sweep %s stopped by SIGINT/SIGTERM; the same command continues it", sweep_name)
        raise SystemExit(130) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
