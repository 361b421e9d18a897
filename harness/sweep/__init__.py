"""Sweeps: which jobs a grid expands to, which are done, what each job may use, and how a sweep stops.

`python -m harness +sweep=<name>` composes conf/sweep/<name>.yaml, whose `hydra.sweeper` is the `harness` sweeper
(hydra_plugins/harness_sweeper, a thin shell around this package). The logic lives here so that it can be read
and tested without Hydra's plugin machinery. One sweep walks through the modules in this order:

  grid        expand the params into jobs: rank-free variants once per task x seed, `when:` rules
  state       each job's run_key and row status (skip what is done: how a sweep resumes; dry_run lists it),
              launch order for init_from, and one lock per run so that two processes never run the same run
  resources   per job: torch threads (jobs x threads <= cores), a GPU of its own, a DataLoader start method
  lifecycle   the stop protocol: every SIGTERM/SIGINT handler of the harness, for runs, workers and the sweep
  slurm       a SLURM array: submit, the bounded wait, requeue a preempted job
  summary     at the end: how this sitting's runs ended and which did not end ok (the SweepSummary callback)

The names below are what the rest of the harness uses; the modules hold the rest.
"""

from harness.sweep import slurm
from harness.sweep.grid import expand_jobs, override_key, uses_rank
from harness.sweep.lifecycle import (end_interrupted_job, in_sweep_process, interruptible, run_guard,
                                     stop_between_runs, stops_held, sweep_guard, sweep_stopping)
from harness.sweep.resources import configure_resources
from harness.sweep.state import (JobState, claim_run, dependency_waves, format_listing, job_state, job_states,
                                 lock_holder, lock_path, other_rows,
                                 rerun_sources_without_adapter, todo_jobs)
from harness.sweep.summary import (SweepSummary, format_summary, job_errors, job_failure, log_summary,
                                   record_job_error, sitting_rows, sitting_start)

__all__ = [
    "JobState", "SweepSummary", "claim_run", "configure_resources", "dependency_waves", "end_interrupted_job",
    "expand_jobs", "format_listing", "format_summary", "in_sweep_process", "interruptible", "job_errors",
    "job_failure", "job_state", "job_states", "lock_holder", "lock_path", "log_summary", "other_rows",
    "override_key", "record_job_error", "rerun_sources_without_adapter", "run_guard", "sitting_rows", "sitting_start", "slurm", "stop_between_runs",
    "stops_held", "sweep_guard", "sweep_stopping", "todo_jobs", "uses_rank",
]
