"""One Parquet row per run, same columns for every task, written so that a half-written row never exists.

Layout: <results_dir>/<sweep>/runs/<run_key>.parquet is the row; <run_key>/ beside it holds the per-eval
history, the validation predictions, the resolved config and the saved adapter. The row is written last,
by rename, so its presence means the run's files are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

STATUSES = ("ok", "failed", "diverged", "oom", "interrupted")

# The fixed superset of task metrics (row columns metric_<name>); a task reporting another name is a bug.
METRIC_NAMES = [
    "accuracy", "f1", "mcc", "pearson", "spearman", "accuracy_mm",
    "exact", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1",
    "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
]

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
SCHEMA = pa.schema(
    # identity
    [("run_key", _S), ("sweep", _S), ("status", _S), ("error", _S)]
    # config
    + [("task", _S), ("variant", _S), ("impl", _S), ("rank", _I), ("alpha", _F), ("seed", _I), ("model", _S),
       ("lr", _F), ("schedule", _S), ("warmup_steps", _I), ("batch_size", _I), ("grad_accum", _I), ("epochs", _F),
       ("max_steps", _I), ("max_seq_len", _I), ("targets", _S), ("targeted_modules", _I), ("precision", _S),
       ("protocol", _S), ("train_examples", _I), ("eval_examples", _I), ("init_from", _S), ("config_json", _S)]
    # sizes
    + [("trainable_params", _I), ("trainable_params_no_head", _I), ("head_params", _I), ("total_params", _I),
       ("adapter_bytes", _I), ("base_weight_bytes", _I)]
    # scores
    + [("primary_metric", _S), ("score_best", _F), ("score_last", _F), ("best_epoch", _F), ("best_step", _I)]
    # train.selection (eval_best | last | heldout), the score of the evaluation it picks, and whether that
    # checkpoint's predictions are constant (one class, or zero variance): a degenerate run
    + [("selection", _S), ("score_selected", _F), ("selected_step", _I), ("degenerate", _B)]
    + [(f"metric_{m}", _F) for m in METRIC_NAMES]
    + [("last_metrics_json", _S), ("rank_scores_json", _S)]  # DyLoRA: {rank: primary metric} at the last eval
    # speed
    + [("steps", _I), ("train_seconds", _F), ("train_samples_per_s", _F), ("train_tokens_per_s", _F),
       ("eval_seconds", _F), ("eval_samples_per_s", _F)]
    # memory
    + [("cuda_peak_allocated_bytes", _I), ("cuda_peak_reserved_bytes", _I), ("cpu_peak_rss_bytes", _I),
       ("param_bytes", _I), ("grad_bytes", _I), ("optimizer_state_bytes", _I), ("saved_activation_bytes", _I),
       ("activation_batch_shape", _S)]
    # provenance
    + [("git_sha", _S), ("git_dirty", _B), ("versions_json", _S), ("device", _S), ("started_at", _S),
       ("finished_at", _S), ("extra_json", _S)]
)
COLUMNS = SCHEMA.names

# Keys that say where or how a run is executed, not what it computes: they never change the run_key.
NON_SEMANTIC = {"results_dir", "sweep_name", "fail_fast", "save_adapter", "device", "hydra", "dry_run"}
NON_SEMANTIC_DATA = {"dir", "cache_dir"}
NON_SEMANTIC_TRAIN = {"num_workers", "log_every_steps", "eval_batch_size"}


# Train keys added after rows were published, with the value that keeps the old behaviour: at that value a key
# stays out of the hash, so adding it leaves every existing row's run_key (and so resuming its sweep) intact.
ADDED_TRAIN_KEYS = {"head_lr": None, "selection": "eval_best"}
# The same for keys elsewhere, by dotted path (a variant key is dropped only at that value, so dylora's
# frozen=false, the old mode, keeps the old rows' keys while frozen=true, a new computation, gets new ones).
ADDED_KEYS = {"init_from": None, "variant.frozen": False, "data.selection_fraction": 0.1}


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus paths, devices and bookkeeping: what determines the numbers."""
    full = OmegaConf.to_container(cfg, resolve=True)
    full = {k: v for k, v in full.items() if k not in NON_SEMANTIC}
    full["data"] = {k: v for k, v in full.get("data", {}).items() if k not in NON_SEMANTIC_DATA}
    full["train"] = {k: v for k, v in full.get("train", {}).items()
                     if k not in NON_SEMANTIC_TRAIN and not (k in ADDED_TRAIN_KEYS and v == ADDED_TRAIN_KEYS[k])}
    for path, old_value in ADDED_KEYS.items():
        *parents, leaf = path.split(".")
        section = full
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section and section[leaf] == old_value:
            del section[leaf]
    return full


def run_key(cfg: DictConfig) -> str:
    canonical = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def runs_dir(results_dir: str | Path, sweep: str) -> Path:
    return Path(results_dir) / sweep / "runs"


def row_path(results_dir: str | Path, sweep: str, key: str) -> Path:
    return runs_dir(results_dir, sweep) / f"{key}.parquet"


def artifacts_dir(results_dir: str | Path, sweep: str, key: str) -> Path:
    return runs_dir(results_dir, sweep) / key


def atomic_write_parquet(df: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    try:
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(folder: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a fresh folder of its own beside `folder`, then rename it to `folder`: a reader sees a
    complete folder or none, and two processes (or machines sharing the cache) filling it at once never write
    into each other's files; the first rename wins and the other's identical copy is dropped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(scratch / "new")
        try:
            (scratch / "new").rename(folder)
        except OSError:  # another process published it first
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def make_row(values: dict[str, Any]) -> pd.DataFrame:
    """A one-row frame with every column of SCHEMA (missing ones null); unknown keys are a bug."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not results columns: {sorted(unknown)}; add them to results.SCHEMA")
    if values.get("status") not in STATUSES:
        raise ValueError(f"status={values.get('status')!r}; expected one of {STATUSES}")
    return pd.DataFrame([{c: values.get(c) for c in COLUMNS}])


def write_row(results_dir: str | Path, sweep: str, values: dict[str, Any]) -> Path:
    path = row_path(results_dir, sweep, values["run_key"])
    atomic_write_parquet(make_row(values), path, SCHEMA)
    return path


def read_row(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return pq.read_table(path).to_pylist()[0]


def has_ok_row(results_dir: str | Path, sweep: str, key: str) -> bool:
    row = read_row(row_path(results_dir, sweep, key))
    return row is not None and row["status"] == "ok"


def read_rows(*dirs: str | Path) -> pd.DataFrame:
    """Every complete row under the given results folders (a sweep folder, or a folder of sweeps)."""
    files = []
    for folder in map(Path, dirs):
        files += sorted(folder.glob("runs/*.parquet")) + sorted(folder.glob("*/runs/*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    # rows written before a column was added lack it: null there (promote), rather than no table at all
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pandas()


# ---- provenance ---------------------------------------------------------------------------------------
def git_state() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the checkout the harness runs from; (None, None) outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "harness", "conf"],
                                cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "datasets", "numpy", "torchao", "bitsandbytes"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions
