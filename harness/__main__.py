"""`python -m harness [overrides]`: one run, or a sweep with -m / +sweep=<name>. See README."""

import gc

if __name__ == "__main__":  # a process of its own (not a joblib worker importing `main`): see the freeze below
    gc.disable()

import difflib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness import rows, run_keys, sweep, warm_start
from harness.errors import ConfigError, HarnessError, Interrupted, RunBusy, RunFailed, SweepStopping
from harness.run import run
from harness.sweep import lifecycle

# The imports above build about half a million objects (torch, transformers, pandas, scikit-learn) that live as long
# as the process. Unfrozen, the collector's full passes walked them all, over and over: eight passes, 0.9 s of a
# standalone run's start, and 1 s more at exit (benchmarks/README.md). Frozen, every later pass skips them.
if __name__ == "__main__":
    gc.freeze()
    gc.enable()

log = logging.getLogger("harness")

__all__ = ["main"]
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one config and return its primary score; a harness error is one line on stderr (exit 2, or 1 for a run
    that ended other than ok), with the traceback behind HYDRA_FULL_ERROR=1, as Hydra does for its own errors.
    In a sweep the job fails with the error (recorded beside the job's log, so the summary lists it)."""
    hydra_cfg = HydraConfig.get()
    try:
        return run_job(cfg)
    except HarnessError as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            if not isinstance(err, (RunFailed, RunBusy, SweepStopping)):  # those have rows, or owners
                overrides = list(hydra_cfg.overrides.task)
                sweep.record_job_error(Path(hydra_cfg.runtime.output_dir), overrides, err)
                # said now, in the sweep's log: the launcher reports its jobs when the whole batch returns
                log.error("job %s did not start: %s: %s", " ".join(overrides), type(err).__name__, err)
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(err, RunFailed) else 2) from None


def unknown_added_keys(overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> list[str]:
    """One message per `+key=value` / `++key=value` override that adds a key the config does not define, naming
    the closest key it does. Without `+`, Hydra itself rejects an unknown key; with it, a typo (`+train.maxsteps`,
    as Hydra's own hint suggests) would be added silently and change nothing. `compose(overrides)` builds the
    config the other overrides give, so the keys a chosen variant or task defines in its YAML are known."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    added = {i for i, o in enumerate(parsed) if (o.is_add() or o.is_force_add()) and not is_config_group(o)}
    if not added:
        return []
    base = compose([text for i, text in enumerate(overrides) if i not in added])
    messages = []
    for i in sorted(added):
        key = parsed[i].key_or_group
        node, path = base, []
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                where = ".".join(path) or "the top level"
                known = list(node.keys()) if isinstance(node, DictConfig) else []
                close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
                hint = f"did you mean {'.'.join([*path, close[0]])}? " if close else ""
                messages.append(f"{overrides[i]}: {where} has no key {part!r}; {hint}"
                                f"its keys: {', '.join(map(str, known))}. Set an existing key without '+'")
                break
            node, path = node[part], [*path, part]
    return messages


def is_config_group(override) -> bool:
    """`+sweep=cpu_glue`, `hydra/launcher=...`: a config group choice, not a value."""
    key = override.key_or_group
    return key.startswith("hydra") or "/" in key or (CONF_DIR / key).is_dir()


def compose_in_app(overrides: list[str]) -> DictConfig:
    return hydra.compose(config_name="config", overrides=overrides)


def run_job(cfg: DictConfig) -> float:
    """Run one config and return its primary score (what hydra-optuna-sweeper maximises).

    A run that does not end `ok` raises RunFailed after its row is written: a single run exits non-zero,
    and in a sweep the job is marked failed (the harness sweeper goes on unless fail_fast=true; optuna
    records a failed trial). This function owns the run's stop signals (harness/sweep/lifecycle.py): SIGTERM/SIGINT
    end the whole sweep, not just the current run. In the sweep's own process the run exits the process; in a
    worker (joblib, submitit) it fails the job and the worker starts no further run, while the sweep's process stops
    the sweep; a preempted SLURM job requeues itself.
    """
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    unknown = unknown_added_keys(list(hydra_cfg.overrides.task), compose_in_app)
    if unknown:
        raise ConfigError("unknown config keys: " + " | ".join(unknown))
    cfg = warm_start.resolve(cfg)  # init_from=<task> -> the source's run_key (the sweeper resolves it earlier)
    if cfg.dry_run:
        if multirun:
            raise ConfigError("dry_run=true lists a grid sweep's jobs without launching them, which only the "
                              "harness sweeper does (add hydra/sweeper=harness, or use a sweep file); this sweeper "
                              f"({hydra_cfg.sweeper._target_}) launched the job instead")
        state = sweep.job_state(cfg, list(hydra_cfg.overrides.task))
        print(sweep.format_listing(cfg.sweep_name, [state]), flush=True)
        return float("nan")
    sweep.configure_resources(hydra_cfg.launcher, int(hydra_cfg.job.get("num") or 0) if multirun else 0)
    lifecycle.stop_between_runs()
    if lifecycle.sweep_stopping():
        raise SweepStopping("not started: this worker was told to stop (SIGTERM/SIGINT)")
    key = run_keys.run_key(cfg)
    rows.check_writable(cfg.results_dir, cfg.sweep_name)
    try:
        with sweep.claim_run(cfg, key), lifecycle.run_guard():
            row = run(cfg)
    except Interrupted as err:  # the row says "interrupted"; stop the sweep too (a launcher would go on)
        lifecycle.end_interrupted_job(err, key)
    if row["status"] != "ok":
        raise RunFailed(f"run {row['run_key']} {row['status']}: {row['error']}")
    score = row.get("score_best")
    return float("nan") if score is None else float(score)


def renamed_override_errors(argv: list[str]) -> list[str]:
    """One message per command-line override of a retired key (`adapter.impl=peft`), naming the key that holds it
    now (run_keys.RETIRED_KEYS). Hydra alone would answer that the key is "not in struct" and suggest `+`, which
    would add a key nothing reads."""
    messages = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in run_keys.RETIRED_KEYS:
            current = run_keys.RETIRED_KEYS[key]
            messages.append(f"{arg}: {key} is now {current} (one name for the one switch); use {current}={value}")
    return messages


if __name__ == "__main__":
    renamed = renamed_override_errors(sys.argv[1:])
    if renamed:
        print("Error: " + " | ".join(renamed), file=sys.stderr, flush=True)
        raise SystemExit(2)
    main()
    # What the run left needs no collection pass at exit (up to a second with the model in memory). Objects held
    # only by reference cycles are then not finalized; logging, temporary folders and multiprocessing clean up
    # through atexit instead, and nothing of the harness relies on a finalizer.
    gc.freeze()
