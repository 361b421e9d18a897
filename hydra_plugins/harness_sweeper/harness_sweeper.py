"""`hydra/sweeper=harness`: Hydra's basic grid sweeper, plus what a benchmark grid needs.

Select it in a sweep file (`defaults: [override /hydra/sweeper: harness]`, as every grid in conf/sweep/ does) or
on the command line (`-m hydra/sweeper=harness`). It is not the default of conf/config.yaml: a sweep file that
overrides it again (hpo.yaml's optuna) would then keep this one. Config (hydra.sweeper.*):

  params:             the grid, same syntax as the basic sweeper (`a: 1,2`, `range(3)`, `glob(*)`), crossed
                      with any sweep given on the command line
  rank_params:        keys left out for rank-free variants (registry class `uses_rank = False`), so those
                      run once per task x seed, not once per rank. Default: [variant.r]
  when:               {"key=value": [overrides]}: added to the jobs with that choice, in order, replacing
                      earlier overrides of the same keys (`variant=full: [recipe=fairseq_roberta]`),
                      except keys set on the command line, which always win
  max_batch_size:     jobs handed to the launcher at once (null: all). With fail_fast=true the default is
                      the launcher's parallelism, so the sweep stops soon after the first failure.
  unknown_state_timeout_s:  with submitit_slurm, how long a job may go with neither a result nor a state from
                      SLURM (sacct, squeue) before the sweep gives up on it, names it and goes on. Default 600.

Before launching, it composes every job's config as the launcher will, and skips jobs whose run_key
already has an `ok` row (logging each). With `dry_run=true` it prints the job list with each job's
run_key and status and launches nothing. A failed run does not stop the others; when all have run, the
sweep logs which did not end ok and exits non-zero (as Hydra's basic sweeper does for a failed job).
The logic lives in harness/sweep/ (the package's docstring maps it); this file is the plugin shell.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class HarnessSweeperConf:
    _target_: str = "hydra_plugins.harness_sweeper.harness_sweeper.HarnessSweeper"
    params: Optional[Dict[str, str]] = None
    rank_params: List[str] = field(default_factory=lambda: ["variant.r"])
    when: Dict[str, List[str]] = field(default_factory=dict)
    max_batch_size: Optional[int] = None
    unknown_state_timeout_s: float = 600.0


ConfigStore.instance().store(group="hydra/sweeper", name="harness", node=HarnessSweeperConf, provider="harness")


class HarnessSweeper(BasicSweeper):
    def __init__(self, params: Optional[Dict[str, str]] = None, rank_params: Sequence[str] = ("variant.r",),
                 when: Optional[Dict[str, List[str]]] = None,
                 max_batch_size: Optional[int] = None, unknown_state_timeout_s: float = 600.0) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rank_params = list(rank_params)
        self.when = {k: list(v) for k, v in (when or {}).items()}
        self.unknown_state_timeout_s = float(unknown_state_timeout_s)
        self.lost: List[Tuple[str, str]] = []  # (job, why) of jobs that ended without a result
        self.slurm_notes: List[str] = []  # why SLURM stopped the runs whose jobs failed (time limit, scancel)

    def compose(self, overrides: List[str]) -> DictConfig:
        """A job's config, composed exactly as the launcher composes it, without the hydra node."""
        cfg = self.hydra_context.config_loader.load_sweep_config(master_config=self.config,
                                                                 sweep_overrides=list(overrides))
        return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])

    def jobs(self, arguments: List[str]) -> List[List[str]]:
        from harness.sweep import expand_jobs

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        grid = self.split_arguments(overrides, None)[0]
        declared = self.split_arguments(parser.parse_overrides(self._parse_config()), None)[0]  # the file's own grid
        default_variant = self.config.hydra.runtime.choices.get("variant")
        return expand_jobs(grid, default_variant, self.rank_params, self.when, declared=declared,
                           command_line=arguments)

    def batch_size(self) -> Optional[int]:
        """Jobs per launch: max_batch_size; with fail_fast, as many as the launcher runs at once."""
        if self.max_batch_size or not self.config.get("fail_fast"):
            return self.max_batch_size
        launcher = self.config.hydra.launcher
        return int(launcher.get("n_jobs") or 0) if int(launcher.get("n_jobs") or 0) > 0 else (
            int(launcher.get("array_parallelism") or 1) if "submitit" in str(launcher.get("_target_", "")) else 1)

    def sweep(self, arguments: List[str]) -> Any:
        from harness.errors import SweepsFailed
        from harness.sweep import (dependency_waves, format_listing, job_states, log_summary, other_rows,
                                   sitting_start, sweep_guard, todo_jobs)
        from harness.run import leave_out_of_first_run
        from harness.sweep.slurm import format_lost_jobs

        setup_clock = time.perf_counter()
        started = sitting_start()
        sweep_name = self.config.get("sweep_name")
        states = job_states(self.jobs(arguments), self.compose)  # also validates every job's config
        if self.config.get("dry_run"):
            extra = other_rows(self.config.results_dir, sweep_name, states)
            print(format_listing(sweep_name, states, extra), flush=True)
            return []
        todo = todo_jobs(sweep_name, states)
        waves = dependency_waves(todo)  # init_from sources run before their users

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # A launcher that runs the jobs in this process (Hydra's basic one) charges the first of them from the
        # process's start, for the imports; composing and checking the whole grid is not that run's time
        leave_out_of_first_run(time.perf_counter() - setup_clock)
        returns, failures, launched = [], 0, 0
        try:
            with sweep_guard(self.config.results_dir, sweep_name, [s.run_key for s in todo]):  # SIGTERM/SIGINT: stop
                for wave in waves:
                    wave_returns, wave_failures = self.launch_batches([s.overrides for s in wave],
                                                                      [s.run_key for s in wave], first_idx=launched)
                    returns += wave_returns
                    failures += wave_failures
                    launched += len(wave)
        except SystemExit:  # stopped by a signal: how this sitting's runs ended so far, its jobs' errors included
            log_summary(self.config.results_dir, sweep_name, started, sweep_dir)
            raise
        if failures:  # like Hydra's basic sweeper, a failed job fails the multirun, but only after all ran
            log_summary(self.config.results_dir, sweep_name, started, sweep_dir)
            if self.slurm_notes:
                log.warning("SLURM stopped %d of those runs:\n  %s", len(self.slurm_notes), "\n  ".join(self.slurm_notes))
            if self.lost:
                log.error("%s", format_lost_jobs(self.lost))
            raise SweepsFailed(f"{failures} of {len(todo)} jobs did not end ok (listed above); "
                               "re-running the same command (without rerun=true) retries them and skips the rest")
        return returns

    def launch_batches(self, todo: List[List[str]], keys: List[str],
                       first_idx: int = 0) -> Tuple[List[Sequence[JobReturn]], int]:
        """Launch the jobs (overrides `todo`, run_keys `keys`, numbered from `first_idx`) batch by batch; (the
        launchers' returns, how many jobs failed)."""
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        from harness import rows
        from harness.errors import RunFailed
        from harness.sweep import job_failure
        from harness.sweep.slurm import launch_array

        returns: List[Sequence[JobReturn]] = []
        failures = 0
        size = self.batch_size() or max(1, len(todo))
        job_idx = first_idx
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            try:
                if getattr(self.launcher, "_EXECUTOR", None) == "slurm":
                    job_returns, lost = launch_array(self.launcher, self.config, batch, job_idx, keys[start:start + size],
                                                     self.unknown_state_timeout_s)
                    self.lost += lost
                else:
                    job_returns = self.launcher.launch(batch, initial_job_idx=job_idx)
            except TerminatedWorkerError as err:
                # The OS killed a joblib worker (out of memory, most likely): joblib then kills the batch's
                # other workers too and returns nothing for it. Their runs have no row; go on, say so.
                missing = [k for k in keys[start:start + size]
                           if not rows.has_ok_row(self.config.results_dir, self.config.sweep_name, k)]
                log.error("a job of this batch ended without returning (%s: %s); %d of its %d runs have no ok "
                          "row: %s. The same command runs them again.", type(err).__name__, err, len(missing),
                          len(batch), " ".join(missing))
                if self.config.get("fail_fast"):
                    raise
                failures += len(missing)
                job_idx += len(batch)
                continue
            job_idx += len(batch)
            returns.append(job_returns)
            for overrides, job_return in zip(batch, job_returns):
                if job_return is None:  # a SLURM job that left no result: named in self.lost
                    failures += 1
                    if self.config.get("fail_fast"):
                        raise RunFailed(": ".join(self.lost[-1]))
                    continue
                error = job_failure(overrides, job_return)  # logged as what it means
                if error is None:
                    continue
                failures += 1
                if isinstance(error, RunFailed) and "SLURM job" in str(error):
                    self.slurm_notes.append(str(error))
                if self.config.get("fail_fast"):
                    raise error
        return returns, failures
