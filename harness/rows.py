"""One Parquet row per run, same columns for every task, written so that a half-written row never exists.

Layout: <results_dir>/<sweep>/runs/<run_key>.parquet is the row (the run_key: harness/run_keys.py); <run_key>/
beside it holds the per-eval history, the validation predictions, the resolved config and the saved adapter. The
row is written last, by rename (harness/atomic.py), so its presence means the run's files are complete. Here too:
reading rows back (a corrupt file is set aside, a column added since a row was written reads as null), and the
provenance every row records (git state, library versions).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness.atomic import atomic_write_parquet
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
    [("run_key", _S), ("sweep", _S), ("status", _S), ("error", _S), ("data_fingerprint", _S),
     ("model_fingerprint", _S)]
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


def runs_dir(results_dir: str | Path, sweep: str) -> Path:
    return Path(results_dir) / sweep / "runs"


def row_path(results_dir: str | Path, sweep: str, key: str) -> Path:
    return runs_dir(results_dir, sweep) / f"{key}.parquet"


def artifacts_dir(results_dir: str | Path, sweep: str, key: str) -> Path:
    return runs_dir(results_dir, sweep) / key


def adapter_file(results_dir: str | Path, sweep_name: str, key: str) -> Path | None:
    """The adapter file a warm start from run `key` loads: its selected checkpoint (adapter_best.safetensors) when
    that is not its last state, else adapter.safetensors; None when neither exists."""
    artifacts = artifacts_dir(results_dir, sweep_name, key)
    return next((p for p in (artifacts / "adapter_best.safetensors", artifacts / "adapter.safetensors")
                 if p.exists()), None)


def make_row(values: dict[str, Any]) -> pd.DataFrame:
    """A one-row frame with every column of SCHEMA (missing ones null); unknown keys are a bug, and so is an `ok`
    row holding a non-finite score (the run diverged, or its metric is undefined: it is not ok)."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not results columns: {sorted(unknown)}; add them to rows.SCHEMA")
    if values.get("status") not in STATUSES:
        raise ValueError(f"status={values.get('status')!r}; expected one of {STATUSES}")
    if values["status"] == "ok" and (bad := non_finite_scores(values)):
        raise ValueError(f"run {values.get('run_key')}: an ok row cannot hold non-finite scores {bad}")
    return pd.DataFrame([{c: values.get(c) for c in COLUMNS}])


SCORE_COLUMNS = ["score_best", "score_last", "score_selected"] + [f"metric_{m}" for m in METRIC_NAMES]


def non_finite_scores(row: dict[str, Any]) -> dict[str, Any]:
    """The score and metric values of `row` (its columns, and the last evaluation's metrics) that are NaN or
    infinite; a score that was not measured (None) is not one of them."""
    values = {c: row.get(c) for c in SCORE_COLUMNS}
    if isinstance(row.get("last_metrics_json"), str):
        values.update({f"last.{k}": v for k, v in json.loads(row["last_metrics_json"]).items()
                       if k not in ("step", "epoch")})
    if isinstance(row.get("rank_scores_json"), str):  # DyLoRA's score at each rank
        values.update({f"rank_scores.{k}": v for k, v in json.loads(row["rank_scores_json"]).items()})
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)}


def made_with_other_weights(row: dict[str, Any] | None, model_fingerprint: str | None) -> bool:
    """Whether a row recorded loading other model files than `model_fingerprint` (run_keys.model_fingerprint): the
    same path with other weights. Rows from before the column, and models without a fingerprint, cannot tell."""
    recorded = None if row is None else row.get("model_fingerprint")
    return recorded is not None and model_fingerprint is not None and recorded != model_fingerprint


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
    """Every complete row under the given results folders (a sweep folder, or a folder of sweeps), with the
    `artifacts` folder beside each row's file (its history, predictions and adapters: the same run_key can sit in
    two sweeps). An unreadable file is skipped with a warning naming it (and moved to runs/.corrupt/ with
    `set_aside`)."""
    files = []
    for folder in map(Path, dirs):
        files += sorted(folder.glob("runs/*.parquet")) + sorted(folder.glob("*/runs/*.parquet"))
    tables = [table.append_column("artifacts", pa.array([str(file.with_suffix(""))] * table.num_rows))
              for file, table in ((f, read_table(f, set_aside)) for f in files) if table is not None]
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in [*COLUMNS, "artifacts"]})
    # Rows written before a column was added lack it: they read as null there (promote), not as an error.
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    return frame.reindex(columns=[*COLUMNS, *(c for c in frame.columns if c not in COLUMNS)])


def load_rows(*dirs: str | Path, ok_only: bool = False, flatten_config: bool = False,
              with_history: bool = False) -> pd.DataFrame:
    """Every row under the results folders as one DataFrame: `harness.load_rows("results/cpu_glue")`.

    A folder is a sweep's (results/<sweep>) or one holding sweeps (results); `artifacts` is each run's folder
    (history.parquet, predictions.parquet, adapters). `ok_only`: only runs that ended ok.
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
    frame = read_rows(*dirs)
    for field in SCHEMA:  # integer columns with gaps stay integers (pandas would make them floats)
        if pa.types.is_integer(field.type) and field.name in frame:
            frame[field.name] = frame[field.name].astype("Int64")
    if ok_only:
        frame = frame[frame["status"] == "ok"]
    frame = frame.reset_index(drop=True)
    if flatten_config:
        configs = pd.json_normalize([json.loads(c) if isinstance(c, str) else {} for c in frame["config_json"]],
                                    sep=".").add_prefix("config.")
        frame = pd.concat([frame, configs.set_index(frame.index)], axis=1)
    if with_history:
        histories = [pd.read_parquet(Path(folder) / "history.parquet").assign(artifacts=folder)
                     for folder in frame["artifacts"].unique() if (Path(folder) / "history.parquet").is_file()]
        if histories:
            frame = frame.merge(pd.concat(histories, ignore_index=True), on="artifacts", how="left",
                                suffixes=("", "_history"))
    return frame


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
