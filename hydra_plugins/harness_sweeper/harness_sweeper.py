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
The logic lives in harness/sweep.py; this file is the plugin shell.
"""

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
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
        from harness.sweep import (SWEEP_PID, SweepsFailed, dependency_waves, format_listing, job_states, log_summary,
                                   other_rows, sitting_start, stop_workers)

        started = sitting_start()
        sweep_name = self.config.get("sweep_name")
        states = job_states(self.jobs(arguments), self.compose)  # also validates every job's config
        if self.config.get("dry_run"):
            extra = other_rows(self.config.results_dir, sweep_name, states)
            print(format_listing(sweep_name, states, extra), flush=True)
            return []
        for state in states:
            if state.done:
                log.info("skip run %s (%s): it already has an ok row", state.run_key, " ".join(state.overrides))
        todo = [s.overrides for s in states if not s.done]
        todo_keys = [s.run_key for s in states if not s.done]
        waves = dependency_waves([s for s in states if not s.done])  # init_from sources run before their users
        log.info("sweep %s: %d jobs, %d already done, %d to run", sweep_name, len(states),
                 len(states) - len(todo), len(todo))
        kept_from = sorted({str(s.device) for s in states if s.done})
        if kept_from:  # the launcher may run jobs elsewhere (a cluster), so this process cannot judge a mismatch
            log.info("the %d rows kept were measured on: %s (their speed and memory belong there; to measure "
                     "elsewhere, use another sweep_name)", len(states) - len(todo), ", ".join(kept_from))

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # SIGTERM or SIGINT to the sweep: the runs in local workers are told first (stop_workers) and write
        # their `interrupted` rows; then it acts like Ctrl-C, and a parallel launcher stops its workers
        # (joblib's would otherwise be orphaned, still running). A run in this process handles the signal
        # itself (its row, then SystemExit). Workers and submitit jobs know this process by HARNESS_SWEEP_PID.
        os.environ[SWEEP_PID] = str(os.getpid())

        def stop(signum, frame):
            for number in (signal.SIGTERM, signal.SIGINT):
                signal.signal(number, signal.SIG_IGN)  # once: a second signal must not start this again
            stop_workers(self.config.results_dir, sweep_name, todo_keys)
            raise KeyboardInterrupt

        previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            returns, failures, launched = [], 0, 0
            for wave in waves:
                wave_returns, wave_failures = self.launch_batches([s.overrides for s in wave], [s.run_key for s in wave],
                                                                  first_idx=launched)
                returns += wave_returns
                failures += wave_failures
                launched += len(wave)
        except KeyboardInterrupt:
            log.warning("sweep %s stopped by SIGINT/SIGTERM; the same command continues it", sweep_name)
            raise SystemExit(130) from None
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        if failures:  # like Hydra's basic sweeper, a failed job fails the multirun, but only after all ran
            log_summary(self.config.results_dir, sweep_name, started, sweep_dir)
            if self.slurm_notes:
                log.warning("SLURM stopped %d of those runs:\n  %s", len(self.slurm_notes), "\n  ".join(self.slurm_notes))
            if self.lost:
                from harness.slurm import format_lost_jobs
                log.error("%s", format_lost_jobs(self.lost))
            raise SweepsFailed(f"{failures} of {len(todo)} jobs did not end ok (listed above); "
                               "re-running the same command retries them and skips the rest")
        return returns

    def launch_batches(self, todo: List[List[str]], keys: List[str],
                       first_idx: int = 0) -> Tuple[List[Sequence[JobReturn]], int]:
        """Launch the jobs (overrides `todo`, run_keys `keys`, numbered from `first_idx`) batch by batch; (the
        launchers' returns, how many jobs failed)."""
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        from harness import results as rows
        from harness.errors import HarnessError
        from harness.sweep import RunBusy, RunFailed, SweepStopping

        returns: List[Sequence[JobReturn]] = []
        failures = 0
        size = self.batch_size() or max(1, len(todo))
        job_idx = first_idx
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            try:
                if getattr(self.launcher, "_EXECUTOR", None) == "slurm":
                    results = self.launch_slurm(batch, job_idx, keys[start:start + size])
                else:
                    results = self.launcher.launch(batch, initial_job_idx=job_idx)
            except TerminatedWorkerError as err:
                # The OS killed a joblib worker (out of memory, most likely): joblib then kills the batch's
                # other workers too and returns nothing for it. Their runs have no row; go on, say so.
                lost = [k for k in keys[start:start + size]
                        if not rows.has_ok_row(self.config.results_dir, self.config.sweep_name, k)]
                log.error("a job of this batch ended without returning (%s: %s); %d of its %d runs have no ok "
                          "row: %s. The same command runs them again.", type(err).__name__, err, len(lost),
                          len(batch), " ".join(lost))
                if self.config.get("fail_fast"):
                    raise
                failures += len(lost)
                job_idx += len(batch)
                continue
            job_idx += len(batch)
            returns.append(results)
            for overrides, ret in zip(batch, results):
                if ret is None:  # a SLURM job that left no result: named in self.lost
                    failures += 1
                    if self.config.get("fail_fast"):
                        raise RunFailed(": ".join(self.lost[-1]))
                    continue
                if ret.status != JobStatus.FAILED:
                    continue
                error = ret._return_value  # the job's exception (return_value would re-raise it)
                if isinstance(error, (RunBusy, SweepStopping)):
                    log.info("%s", error)
                    continue
                failures += 1
                if isinstance(error, RunFailed) and "SLURM job" in str(error):
                    self.slurm_notes.append(str(error))
                if isinstance(error, HarnessError) and not isinstance(error, RunFailed):  # bad config: no row
                    log.error("job %s did not start: %s", " ".join(overrides), error)
                elif not isinstance(error, RunFailed):  # crashed before or after writing its row: a bug, say so
                    log.error("job %s crashed without a result row: %s: %s", " ".join(overrides),
                              type(error).__name__, error)
                if self.config.get("fail_fast"):
                    raise error
        return returns, failures

    def launch_slurm(self, batch: List[List[str]], initial_job_idx: int, keys: List[str]) -> List[Optional[JobReturn]]:
        """Submit `batch` as one SLURM array, as hydra-submitit-launcher's `launch` does, but wait for it without
        hanging: a job whose state cannot be learned is given up after unknown_state_timeout_s, and a job that
        ends without a result (SIGKILL, out of memory) is named in self.lost rather than failing the batch.
        Its returns: the job's JobReturn, or None for a lost job."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        from harness.slurm import ClusterJob, await_cluster_jobs

        launcher = self.launcher
        params = dict(launcher.params)
        limit_s = 60 * int(params.get("timeout_min") or 0)
        if limit_s and int(params.get("signal_delay_s") or 0) + 60 >= limit_s // 2:
            # submitit's SIGUSR2 warns signal_delay_s before the limit (SLURM may send it up to 60 s earlier still).
            # A run ignores it (it cannot checkpoint), but one that arrives while the job is starting kills it.
            log.warning("hydra.launcher.signal_delay_s=%s (+ up to 60 s SLURM may add) reaches into the first half of "
                        "the time limit (timeout_min=%s): submitit's SIGUSR2 could kill jobs as they start; sending it "
                        "1 s before the limit instead", params.get("signal_delay_s"), params.get("timeout_min"))
            params["signal_delay_s"] = 1
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        job_params = []
        for idx, overrides in enumerate(batch, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(launcher, *zip(*job_params))
        labels = {job.job_id: f"job {job.job_id} (run {key}: {' '.join(overrides)})"
                  for job, key, overrides in zip(jobs, keys, batch)}
        log.info("SLURM array %s: %d jobs", jobs[0].job_id.split("_")[0] if jobs else "-", len(jobs))
        lost = await_cluster_jobs([ClusterJob(job.job_id, labels[job.job_id], job.paths.result_pickle.exists)
                                   for job in jobs], unknown_timeout_s=self.unknown_state_timeout_s)
        returns: List[Optional[JobReturn]] = []
        for job in jobs:
            why = lost.get(job.job_id)
            if why is None:
                try:
                    returns.append(job.results()[0])
                    continue
                except Exception as err:  # noqa: BLE001 - the job failed outside the run (submitit, pickling)
                    why = f"SLURM job {job.job_id} failed outside the run: {type(err).__name__}: " + \
                          str(err).strip().splitlines()[0]
            log.error("%s: %s (its log: %s)", labels[job.job_id], why, job.paths.stderr)
            self.lost.append((labels[job.job_id], why))
            returns.append(None)
        return returns
