"""The stop protocol (harness/sweep/lifecycle.py): where a SIGTERM/SIGINT lands decides what it does.

These tests signal this very process, inside the guards, with the handlers put back afterwards. What a whole sweep
does with a signal (rows written `interrupted`, the sweep stopped, a SLURM job requeued) is tested end to end in
tests/test_sweeps.py and tests/slurm/.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from harness.errors import Interrupted, RunFailed
from harness.sweep import lifecycle

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_handlers(monkeypatch):
    """This process's SIGTERM/SIGINT handlers and the lifecycle's state, put back after the test."""
    monkeypatch.setattr(lifecycle, "_process", lifecycle._Process())
    previous = {s: signal.getsignal(s) for s in lifecycle.STOP_SIGNALS}
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


def deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler between bytecodes, at the latest here


def test_only_the_stop_protocol_installs_signal_handlers():
    """Every signal handler of the harness is in harness/sweep/lifecycle.py, so the stop protocol is read in one
    place; run() only marks where it may be cut."""
    installing = re.compile(r"\bsignal\.signal\(|from signal import")
    found = sorted(str(path.relative_to(REPO)) for folder in ("harness", "hydra_plugins")
                   for path in (REPO / folder).rglob("*.py") if installing.search(path.read_text()))
    assert found == ["harness/sweep/lifecycle.py"]


def test_a_second_signal_cannot_cut_the_interrupted_row_short(own_handlers):
    """After the first SIGTERM/SIGINT the run ignores both: a group kill plus the sweeper passing it on, or
    Ctrl-C twice, still leaves the row written."""
    with pytest.raises(Interrupted, match="SIGTERM"), lifecycle.run_guard(), lifecycle.interruptible():
        try:  # what tqdm does while starting a progress bar: no library's `except Exception` swallows it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except Exception:  # noqa: BLE001
            pass
    os.kill(os.getpid(), signal.SIGTERM)  # would end this process if it were not ignored
    os.kill(os.getpid(), signal.SIGINT)   # would raise KeyboardInterrupt
    time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_a_signal_while_the_row_is_written_waits_for_the_row_then_meets_the_handler_from_before(own_handlers):
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    with lifecycle.run_guard():
        with lifecycle.stops_held():
            deliver(signal.SIGTERM)
            deliver(signal.SIGTERM)
            assert seen == [], "the row is being written: the signal waits"
        assert seen == [signal.SIGTERM], "delivered once, when the row is written"
    assert signal.getsignal(signal.SIGTERM) is not lifecycle._on_stop_signal, "the earlier handler is back"


def test_outside_the_marked_parts_a_signal_meets_the_handler_from_before_the_guard(own_handlers):
    """Before run() reaches its interruptible part (or between it and writing the row) nothing is cut: in a worker
    the signal only marks it as stopping, as it would without the guard."""
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    with lifecycle.run_guard():
        deliver(signal.SIGTERM)
    assert seen == [signal.SIGTERM]


def test_without_a_guard_the_marks_install_nothing(own_handlers):
    """A test or notebook calling run() keeps Python's own handling: Ctrl-C is a KeyboardInterrupt, which run()
    still turns into an `interrupted` row."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, also where the runner ignores SIGINT
    before = signal.getsignal(signal.SIGINT)                  # (a background job, an xdist worker)
    with lifecycle.interruptible():
        assert signal.getsignal(signal.SIGINT) is before
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    with lifecycle.stops_held():
        assert signal.getsignal(signal.SIGINT) is before


def test_a_worker_told_to_stop_between_runs_lives_on_and_starts_no_further_run(own_handlers, monkeypatch):
    monkeypatch.setenv(lifecycle.SWEEP_PID, str(os.getppid()))  # the sweep is another process: this is its worker
    assert not lifecycle.in_sweep_process()
    lifecycle.stop_between_runs()
    deliver(signal.SIGTERM)  # would end this process without the worker's handler
    assert lifecycle.sweep_stopping()


def test_an_interrupted_run_in_a_worker_fails_its_job_and_in_the_sweeps_process_exits(own_handlers, monkeypatch):
    monkeypatch.setenv(lifecycle.SWEEP_PID, str(os.getppid()))
    with pytest.raises(RunFailed, match="run k1 interrupted .*its row says so"):
        lifecycle.end_interrupted_job(Interrupted("received SIGTERM", signal.SIGTERM), "k1")
    assert lifecycle.sweep_stopping()
    monkeypatch.setenv(lifecycle.SWEEP_PID, str(os.getpid()))
    with pytest.raises(SystemExit) as stopped:
        lifecycle.end_interrupted_job(Interrupted("received SIGINT", signal.SIGINT), "k2")
    assert stopped.value.code == 128 + signal.SIGINT
