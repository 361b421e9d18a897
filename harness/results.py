"""One Parquet row per run, same columns for every task, written so that a half-written row never exists.

Layout: <results_dir>/<sweep>/runs/<run_key>.parquet is the row; <run_key>/ beside it holds the per-eval
history, the validation predictions, the resolved config and the saved adapter. The row is written last,
by rename, so its presence means the run's files are complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
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

from harness.errors import ConfigError

log = logging.getLogger(__name__)

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
    [("run_key", _S), ("sweep", _S), ("status", _S), ("error", _S), ("data_fingerprint", _S)]
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
       ("eval_seconds", _F), ("eval_samples_per_s", _F), ("train_padding_ratio", _F), ("eval_padding_ratio", _F),
       ("wall_seconds", _F), ("setup_seconds", _F)]
    # memory
    + [("cuda_peak_allocated_bytes", _I), ("cuda_peak_reserved_bytes", _I), ("cpu_peak_rss_bytes", _I),
       ("param_bytes", _I), ("grad_bytes", _I), ("optimizer_state_bytes", _I), ("saved_activation_bytes", _I),
       ("activation_batch_shape", _S)]
    # provenance
    + [("git_sha", _S), ("git_dirty", _B), ("versions_json", _S), ("device", _S), ("started_at", _S),
       ("finished_at", _S), ("extra_json", _S)]
    + [("tracker_run_ids", _S)]  # {tracker: its run's id} as JSON, for logger=tensorboard|mlflow|wandb
)
COLUMNS = SCHEMA.names

# ---- the run_key ----------------------------------------------------------------------------------------
# run_key = hash of {key_version, the semantic config, the data fingerprint}. The semantic config is the resolved
# config minus NOT_IN_KEY, and minus every ADDED_KEYS key whose value is the one that keeps the old behaviour.
# To add a config key: if it says where or how a run executes (paths, workers, logging, trackers), add its dotted
# path to NOT_IN_KEY; if it changes what a run computes, add `"group.key": <its default>` to ADDED_KEYS. Either
# way, every committed row keeps its run_key. Changing anything else here moves keys: bump KEY_VERSION and migrate
# the committed rows (python -m harness.migrate_keys results).
KEY_VERSION = 2
NOT_IN_KEY = {"results_dir", "sweep_name", "fail_fast", "save_adapter", "device", "hydra", "dry_run", "rerun", "logger",
              "data.dir", "data.cache_dir", "train.num_workers", "train.log_every_steps", "train.eval_batch_size",
              "variant.label", "task.label"}  # labels: display names for tables (renaming one changes no number)
ADDED_KEYS = {"train.head_lr": None, "train.group_by_length": False, "train.selection": "eval_best",
              "data.selection_fraction": 0.1, "init_from": None,  # warm start (issue 14)
              "variant.frozen": False}  # DyLoRA: frozen=false (the old mode) keeps old keys; true, new ones


# Keys that older configs had and today's do not, each with the key that now holds its value (it always held the
# same). A config without the retired key gets it back, with that value, before hashing: committed rows and today's
# runs of the same config share their run_key, with no migration. `adapter.impl` was a second name for the
# implementation switch (the variant YAMLs read `impl: ${adapter.impl}`); `variant.impl` is the one name now.
RETIRED_KEYS = {"adapter.impl": "variant.impl"}


def semantic_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config minus paths, devices and bookkeeping: what determines the numbers (the data aside)."""
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    for retired, current in RETIRED_KEYS.items():
        restore_retired_key(full, retired, current)

    def keep(path: str, value: Any) -> bool:
        return path not in NOT_IN_KEY and not (path in ADDED_KEYS and value == ADDED_KEYS[path])

    def prune(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {k: prune(v, f"{prefix}{k}.") if isinstance(v, dict) else v
                for k, v in node.items() if keep(prefix + k, v)}

    return prune(full, "")


def restore_retired_key(config: dict[str, Any], retired: str, current: str) -> None:
    """Put `retired` (a dotted path) back into `config` with the value at `current`, unless it is there already
    (an older config) or `current` is missing."""
    node: Any = config
    for part in current.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    *parents, leaf = retired.split(".")
    target = config
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            return
    target.setdefault(leaf, node)


def data_fingerprint(cfg: DictConfig | dict[str, Any]) -> str | None:
    """A hash of the rows of every local split file the run reads (each split's `content_hash`, the token cache's
    key), so that other data means another run_key; None when the data comes from the hub (a published dataset
    is named by its hub id, which is in the task config). A missing file counts as missing: the run then fails
    naming it."""
    files = split_files(cfg)
    if files is None:
        return None
    hashes = {split: split_fingerprint(path) for split, path in files.items()}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def split_files(cfg: DictConfig | dict[str, Any]) -> dict[str, Path] | None:
    """{split: local Parquet file} of the splits a run reads under its protocol; None for hub data."""
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    task, data = full.get("task") or {}, full.get("data") or {}
    if not data.get("dir") or not task.get("local_subdir"):
        return None
    splits = list(task.get("eval_splits") or [])
    if data.get("protocol", "standard") == "holdout" and task.get("holdout"):
        splits.insert(0, task["holdout"]["source_split"])
    elif task.get("train_split"):
        splits.insert(0, task["train_split"])
    folder = Path(data["dir"]).expanduser() / task["local_subdir"]
    return {split: folder / f"{split}.parquet" for split in dict.fromkeys(splits)}


_split_hashes: dict[tuple[str, int, int], str] = {}


def split_fingerprint(path: Path) -> str:
    """`content_hash` of one split file's rows ("missing" without the file), remembered per (path, size, mtime)."""
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _split_hashes:
        import datasets  # slow to import; only runs on local data need it

        from harness.tasks.base import content_hash

        _split_hashes[memo] = content_hash(datasets.Dataset(pq.read_table(path)))
    return _split_hashes[memo]


def run_key(cfg: DictConfig | dict[str, Any], fingerprint: str | None = None) -> str:
    """The run's identity: its semantic config and its data (`fingerprint`: data_fingerprint(cfg), computed when
    not given)."""
    fingerprint = fingerprint if fingerprint is not None else data_fingerprint(cfg)
    identity = {"key_version": KEY_VERSION, "config": semantic_config(cfg), "data": fingerprint}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
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
    """A one-row frame with every column of SCHEMA (missing ones null); unknown keys are a bug, and so is an `ok`
    row holding a non-finite score (the run diverged, or its metric is undefined: it is not ok)."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not results columns: {sorted(unknown)}; add them to results.SCHEMA")
    if values.get("status") not in STATUSES:
        raise ValueError(f"status={values.get('status')!r}; expected one of {STATUSES}")
    if values["status"] == "ok" and (bad := non_finite_scores(values)):
        raise ValueError(f"run {values.get('run_key')}: an ok row cannot hold non-finite scores {bad}")
    return pd.DataFrame([{c: values.get(c) for c in COLUMNS}])


SCORE_COLUMNS = ["score_best", "score_last"] + [f"metric_{m}" for m in METRIC_NAMES]


def non_finite_scores(row: dict[str, Any]) -> dict[str, Any]:
    """The score and metric values of `row` (its columns, and the last evaluation's metrics) that are NaN or
    infinite; a score that was not measured (None) is not one of them."""
    values = {c: row.get(c) for c in SCORE_COLUMNS}
    if isinstance(row.get("last_metrics_json"), str):
        values.update({f"last.{k}": v for k, v in json.loads(row["last_metrics_json"]).items()
                       if k not in ("step", "epoch")})
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)}


def is_done(row: dict[str, Any] | None) -> bool:
    """Whether a run's row counts as finished: `ok` with a finite score. Older code wrote `ok` rows with a NaN
    score, which Parquet stores as null; such a run is done again."""
    return (row is not None and row["status"] == "ok" and row.get("score_best") is not None
            and not non_finite_scores(row))


def write_row(results_dir: str | Path, sweep: str, values: dict[str, Any]) -> Path:
    path = row_path(results_dir, sweep, values["run_key"])
    atomic_write_parquet(make_row(values), path, SCHEMA)
    return path


def read_table(path: Path, set_aside: bool) -> pa.Table | None:
    """A row file's table in SCHEMA's columns (a column added since the file was written is null), or None when
    the file cannot be read: a warning names it, and with `set_aside` it moves to runs/.corrupt/ so that its run
    counts as not done and runs again."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        moved = ""
        if set_aside:
            target = path.parent / ".corrupt" / f"{path.name}.{dt.datetime.now():%Y%m%d-%H%M%S-%f}"
            try:
                target.parent.mkdir(exist_ok=True)
                path.rename(target)
                moved = f"; moved to {target}, so its run counts as not done"
            except OSError:
                pass
        log.warning("unreadable row file %s (%s: %s)%s", path, type(err).__name__, str(err).splitlines()[0], moved)
        return None
    columns = [table.column(c).cast(SCHEMA.field(c).type) if c in table.column_names
               else pa.nulls(table.num_rows, SCHEMA.field(c).type) for c in COLUMNS]
    return pa.table(columns, schema=SCHEMA)


def read_row(path: Path) -> dict[str, Any] | None:
    """The row at `path`; None when there is none, or when the file is corrupt (then set aside, with a warning)."""
    if not path.exists():
        return None
    table = read_table(path, set_aside=True)
    return None if table is None else table.to_pylist()[0]


def has_ok_row(results_dir: str | Path, sweep: str, key: str) -> bool:
    return is_done(read_row(row_path(results_dir, sweep, key)))


def read_rows(*dirs: str | Path, set_aside: bool = False) -> pd.DataFrame:
    """Every complete row under the given results folders (a sweep folder, or a folder of sweeps). An unreadable
    file is skipped with a warning naming it (and moved to runs/.corrupt/ with `set_aside`)."""
    files = []
    for folder in map(Path, dirs):
        files += sorted(folder.glob("runs/*.parquet")) + sorted(folder.glob("*/runs/*.parquet"))
    tables = [t for t in (read_table(f, set_aside) for f in files) if t is not None]
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    # Rows written before a column was added lack it: they read as null there (promote), not as an error.
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    return frame.reindex(columns=[*COLUMNS, *(c for c in frame.columns if c not in COLUMNS)])


def load_rows(*dirs: str | Path, ok_only: bool = False, flatten_config: bool = False,
              with_history: bool = False) -> pd.DataFrame:
    """Every row under the results folders as one DataFrame: `harness.load_rows("results/cpu_glue")`.

    A folder is a sweep's (results/<sweep>) or one holding sweeps (results). `ok_only`: only runs that ended ok.
    `flatten_config`: the resolved config as columns too, `config.train.lr`, `config.variant.r`, ... (lists stay
    lists). `with_history`: one line per evaluation, the run's columns repeated beside its history.parquet's
    (step, epoch, train_loss, score, the metrics; `setting` for DyLoRA's per-rank lines); a run that never
    evaluated keeps one line with those empty.
    """
    from harness.errors import DataError

    if not dirs:
        raise DataError("give at least one results folder, e.g. load_rows('results/cpu_glue')")
    missing = [str(d) for d in dirs if not Path(d).is_dir()]
    if missing:
        raise DataError(f"results folder {missing[0]!r} does not exist; pass the folder a sweep wrote "
                        "(results/<sweep_name>) or one holding several sweeps (results)")
    rows = read_rows(*dirs)
    for field in SCHEMA:  # integer columns with gaps stay integers (pandas would make them floats)
        if pa.types.is_integer(field.type) and field.name in rows:
            rows[field.name] = rows[field.name].astype("Int64")
    if ok_only:
        rows = rows[rows["status"] == "ok"]
    rows = rows.reset_index(drop=True)
    if flatten_config:
        configs = pd.json_normalize([json.loads(c) if isinstance(c, str) else {} for c in rows["config_json"]],
                                    sep=".").add_prefix("config.")
        rows = pd.concat([rows, configs.set_index(rows.index)], axis=1)
    if with_history:
        histories = []
        for sweep, key in zip(rows["sweep"], rows["run_key"]):
            folders = [Path(d) / "runs" / key for d in dirs] + [Path(d) / sweep / "runs" / key for d in dirs]
            path = next((f / "history.parquet" for f in folders if (f / "history.parquet").is_file()), None)
            if path is not None:
                histories.append(pd.read_parquet(path).assign(sweep=sweep, run_key=key))
        if histories:
            rows = rows.merge(pd.concat(histories, ignore_index=True), on=["sweep", "run_key"], how="left",
                              suffixes=("", "_history"))
    return rows


def check_writable(results_dir: str | Path, sweep: str) -> None:
    """Create and remove a file in the sweep's runs/ folder, so that an unwritable results_dir is found before an
    hour of training, not after."""
    folder = runs_dir(results_dir, sweep)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"results_dir={str(results_dir)!r}: cannot write to {folder} ({type(err).__name__}: "
                          f"{err.strerror or err}); set results_dir to a writable folder") from err


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
