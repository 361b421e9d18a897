"""`python -m harness [overrides]`: one run, or a sweep with -m / +sweep=<name>. See README."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness import results, sweep, warm_start
from harness.errors import ConfigError, Interrupted
from harness.run import run
from harness.sweep import RunFailed

log = logging.getLogger("harness")

__all__ = ["main", "RunFailed"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one config and return its primary score (what hydra-optuna-sweeper maximises).

    A run that does not end `ok` raises RunFailed after its row is written: a single run exits non-zero,
    and in a sweep the job is marked failed (the harness sweeper goes on unless fail_fast=true; optuna
    records a failed trial). SIGTERM/SIGINT end the whole sweep, not just the current run: in the sweep's
    own process the run exits the process; in a worker (joblib, submitit) it fails the job and the worker
    starts no further run, while the sweep's process stops the sweep (see harness/sweep.py).
    """
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    cfg = warm_start.resolve(cfg)  # init_from=task=<name> -> the source's run_key (the sweeper resolves it earlier)
    if cfg.dry_run:
        if multirun:
            raise ConfigError("dry_run=true lists a grid sweep's jobs without launching them, which only the "
                              "harness sweeper does (add hydra/sweeper=harness, or use a sweep file); this sweeper "
                              f"({hydra_cfg.sweeper._target_}) launched the job instead")
        state = sweep.job_state(cfg, list(hydra_cfg.overrides.task))
        print(sweep.format_listing(cfg.sweep_name, [state]), flush=True)
        return float("nan")
    sweep.configure_resources(hydra_cfg.launcher, int(hydra_cfg.job.get("num") or 0) if multirun else 0)
    if sweep.stopping():
        raise sweep.SweepStopping("not started: this worker was told to stop (SIGTERM/SIGINT)")
    key = results.run_key(cfg)
    try:
        with sweep.claim_run(cfg, key):
            row = run(cfg)
    except Interrupted as err:  # the row says "interrupted"; stop the sweep too (a launcher would go on)
        log.warning("stopping: %s", err)
        sweep.mark_stopping()
        if sweep.in_sweep_process():
            raise SystemExit(128 + err.signum) from err
        raise RunFailed(f"run {key} interrupted ({err}); its row says so") from err
    if row["status"] != "ok":
        raise RunFailed(f"run {row['run_key']} {row['status']}: {row['error']}")
    score = row.get("score_best")
    return float("nan") if score is None else float(score)


if __name__ == "__main__":
    main()
