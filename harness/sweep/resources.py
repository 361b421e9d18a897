"""What each job may use of the machine: torch threads, its own GPU, and a DataLoader start method that works.

* `torch_threads`: jobs x threads <= cores (joblib: cores // n_jobs; submitit: the job's cpus_per_task).
* `pin_gpu`: with several local jobs on a multi-GPU machine, one GPU per job through CUDA_VISIBLE_DEVICES, set
  before CUDA is initialised and locked for the life of the worker process.
* `configure_resources`: all of that for the job about to run (harness/__main__.py calls it first).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


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


# The GPU this process claimed, with its open lock file: held for the life of the process, because a joblib worker
# runs many jobs and CUDA cannot change devices once initialised. Process state by nature, so module state here.
_pinned_gpu: tuple[str, Any] | None = None


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
