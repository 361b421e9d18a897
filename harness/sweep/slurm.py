"""SLURM: what a run's job does when SLURM stops it, and how the sweep submits its array and waits without hanging.

* `requeue_interrupted_slurm_job`: what a run's job does after SLURM's SIGTERM (requeue itself when preempted,
  fail when at its time limit or cancelled). The stop protocol (lifecycle.end_interrupted_job) calls it; the
  signal handlers themselves are all in lifecycle.py.
* `launch_array` / `await_cluster_jobs`: the sweep submits a batch as one array and waits for it with a bound,
  naming the jobs that ended without a result or whose state could not be learned.
Tested on a one-node cluster (tests/slurm/, docs/slurm.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


# What a run in a SLURM job does when SLURM stops it (tested on a one-node cluster, tests/slurm/):
# * SIGTERM while the job is still RUNNING (preemption with a GraceTime, `scancel --signal=TERM`): the run writes
#   its `interrupted` row, then the job requeues itself (`scontrol requeue`) and exits without a result, so the
#   sweep keeps waiting; the requeued job runs the run again from its start and ends `ok`. (SLURM's own
#   PreemptMode=REQUEUE does not requeue a job that ends within its grace time: it counts as completed.)
# * SIGTERM when SLURM is ending the job (its time limit, `scancel`): the `interrupted` row names the reason and
#   the job ends as a failed run; the sweep's summary lists it.
# * SIGTERM while SLURM is already requeuing the job (preempted without grace): the row, then exit; SLURM reruns it.
# * submitit's SIGUSR2 ahead of the time limit (`signal_delay_s`) is logged and otherwise ignored: a run cannot
#   checkpoint mid-training, so it uses the time it has left; SLURM's SIGTERM at the limit then stops it.
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
                       "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}
GONE = "GONE"  # the scheduler answered but no longer lists the job (it ended; without accounting, nothing says how)


def slurm_job_id() -> str | None:
    """This process's SLURM job id, `<array>_<task>` for an array task, or None outside SLURM. (An array task's
    SLURM_JOB_ID alone can equal the array's id, and `scontrol requeue <array id>` requeues every task.)"""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` of one job as key -> value ({} when scontrol does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def submitit_slurm_job() -> bool:
    """Whether this process runs in a SLURM job that submitit started (lifecycle.in_submitit_slurm_job adds: and
    is not the sweep's own process, as a submitit_local sweep inside a SLURM allocation would be)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and slurm_job_id() is not None


def requeue_interrupted_slurm_job() -> tuple[bool, str]:
    """After a stop signal in a SLURM job: (whether the job will run again, why). Requeues it when the job is
    still RUNNING (preemption notice, a signal sent by hand); leaves it when SLURM is ending it."""
    job_id = slurm_job_id()
    if job_id is None:
        return False, "not a SLURM job"
    fields = slurm_job_fields(job_id)
    state = fields.get("JobState", "")
    if not fields:
        return False, f"SLURM job {job_id}: scontrol gave no state, so it is not requeued"
    if int(fields.get("Restarts", "0") or 0) > int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0):
        return True, f"SLURM job {job_id} is being requeued by SLURM (preempted)"
    if state != "RUNNING":
        reason = fields.get("Reason", "None")
        why = ("SLURM stopped it at its time limit (" + fields.get("TimeLimit", "?") + ")" if reason == "TimeLimit"
               else f"SLURM is ending it ({state}, reason {reason}: cancelled, e.g. scancel)")
        return False, f"SLURM job {job_id} is not requeued: {why}"
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return False, f"SLURM job {job_id} could not be requeued: {(done.stderr or done.stdout).strip()}"
    preempted = fields.get("PreemptTime", "None") not in ("None", "")
    return True, f"SLURM job {job_id} requeued itself ({'preempted' if preempted else 'signalled while running'})"


def slurm_states(job_ids: Sequence[str]) -> tuple[dict[str, str], str]:
    """({job id: SLURM state, or GONE}, why there was no answer) for array tasks `123_4` or plain jobs.

    sacct first (accounting, as on real clusters); for jobs it does not list (accounting off, or slow to
    catch up) squeue, which lists pending and running jobs, so a job it does not list has ended (GONE).
    An id neither answers for is left out, and the second item says why.
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    parse = SlurmInfoWatcher().read_info  # sacct's parsable output, array ranges included
    found: dict[str, str] = {}
    errors = []
    roots = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["sacct", "-X", "--parsable2", "-o", "JobID,State", "-j", ",".join(roots)],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            found.update({k: v["State"].split()[0] for k, v in parse(out.stdout).items() if v.get("State")})
        else:
            errors.append(f"sacct: {out.stderr.strip() or out.returncode}")
    except (OSError, subprocess.SubprocessError) as err:
        errors.append(f"sacct: {err}")
    missing = [j for j in job_ids if j not in found]
    if missing:
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-u", str(os.getuid()), "-o", "%i|%T"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                listed = {k: v["State"] for k, v in parse("JobID|State\n" + out.stdout).items()}
                found.update({j: listed.get(j, GONE) for j in missing})
            else:
                errors.append(f"squeue: {out.stderr.strip() or out.returncode}")
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"squeue: {err}")
    return {j: s for j, s in found.items() if j in job_ids}, "; ".join(errors)


@dataclass
class ClusterJob:
    job_id: str
    label: str                       # what the sweep's messages call it: the run's overrides and run_key
    has_result: Callable[[], bool]   # the job left its result (its row is written, whatever its status)


def await_cluster_jobs(jobs: Sequence[ClusterJob],
                       states: Callable[[Sequence[str]], tuple[dict[str, str], str]] = slurm_states,
                       unknown_timeout_s: float = 600.0, ended_grace_s: float = 30.0, query_every_s: float = 10.0,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Wait until every job has left its result or is known lost; {job id: why it is lost} for the latter.

    A job is lost when SLURM says it ended (or no longer lists it) and no result came within `ended_grace_s`
    (killed by SIGKILL or for memory, or crashed outside the run), or when for `unknown_timeout_s` neither a
    result came nor the scheduler gave its state (controller down, commands failing). A job SLURM lists as
    pending or running is waited for as long as it takes.
    """
    start = clock()
    last_known = {j.job_id: start for j in jobs}
    ended_since: dict[str, float] = {}
    lost: dict[str, str] = {}
    waiting = {j.job_id: j for j in jobs}
    next_query = start
    while True:
        waiting = {i: j for i, j in waiting.items() if not j.has_result()}
        if not waiting:
            return lost
        now = clock()
        if now >= next_query:
            found, error = states(list(waiting))
            now = clock()
            next_query = now + query_every_s
            for job_id, job in list(waiting.items()):
                state = found.get(job_id)
                if state is not None:
                    last_known[job_id] = now
                if state in ACTIVE_SLURM_STATES:
                    ended_since.pop(job_id, None)
                elif state is not None:
                    since = ended_since.setdefault(job_id, now)
                    if now - since >= ended_grace_s and not job.has_result():
                        ended = "no longer listed by SLURM (no accounting to say how it ended)" if state == GONE \
                            else f"ended {state}"
                        lost[job_id] = (f"SLURM job {job_id} {ended}, and no result came within {ended_grace_s:.0f} s: "
                                        "killed (scancel, SIGKILL, out of memory, node failure) or crashed outside "
                                        "the run")
                        del waiting[job_id]
                elif now - last_known[job_id] >= unknown_timeout_s and not job.has_result():
                    lost[job_id] = (f"SLURM job {job_id}: no result and no state from SLURM for "
                                    f"{now - last_known[job_id]:.0f} s ({error or 'not listed'}); gave up waiting "
                                    "(hydra.sweeper.unknown_state_timeout_s)")
                    del waiting[job_id]
        sleep(1.0)


def format_lost_jobs(lost: Sequence[tuple[str, str]]) -> str:
    """The summary's lines for jobs that ended without a row: (label, why) each."""
    return (f"{len(lost)} jobs ended without a result row (re-running the same command runs them again):"
            + "".join(f"\n  lost        {label}: {why}" for label, why in lost))


def launch_array(launcher: Any, sweep_config: DictConfig, batch: Sequence[Sequence[str]], initial_job_idx: int,
                 keys: Sequence[str], unknown_timeout_s: float) -> tuple[list[Any], list[tuple[str, str]]]:
    """Submit `batch` (run_keys `keys`) as one SLURM array, as hydra-submitit-launcher's `launch` does, but wait for
    it without hanging: a job whose state cannot be learned is given up after `unknown_timeout_s`, and a job that
    ends without a result (SIGKILL, out of memory) is named rather than failing the batch.

    Returns (each job's JobReturn, or None for a lost job; (label, why) of each lost job)."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

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
    sweep_dir = Path(str(sweep_config.hydra.sweep.dir))
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
                               for job in jobs], unknown_timeout_s=unknown_timeout_s)
    returns: list[Any] = []
    lost_jobs: list[tuple[str, str]] = []
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
        lost_jobs.append((labels[job.job_id], why))
        returns.append(None)
    return returns, lost_jobs
