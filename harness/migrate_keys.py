"""`python -m harness.migrate_keys results`: give rows written under an older run_key scheme today's key.

Key version 2 (harness/run_keys.py) added the data fingerprint to the run_key and generalised the list of keys
added at their old value. Each row's key is recomputed from its own resolved config (config_json) and the data
files it names (data.dir, relative to where this runs: the repository root for the committed rows); the row file
and its artifacts folder are renamed, and the row gains its data_fingerprint. A row is changed only when its
config reproduces its current key under the old scheme, so a second run finds nothing to do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from harness import rows, run_keys
from harness.atomic import atomic_write_parquet


def v1_run_key(config: dict[str, Any]) -> str:
    """The run_key before key version 2: the config minus paths and bookkeeping, train.head_lr left out at null."""
    full = {k: v for k, v in config.items()
            if k not in {"results_dir", "sweep_name", "fail_fast", "save_adapter", "device", "hydra", "dry_run"}}
    full["data"] = {k: v for k, v in full.get("data", {}).items() if k not in {"dir", "cache_dir"}}
    for group in ("variant", "task"):  # display names (`label:`), left out since they were added
        if isinstance(full.get(group), dict):
            full[group] = {k: v for k, v in full[group].items() if k != "label"}
    full["train"] = {k: v for k, v in full.get("train", {}).items()
                     if k not in {"num_workers", "log_every_steps", "eval_batch_size"}
                     and not (k == "head_lr" and v is None)}
    canonical = json.dumps(full, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def migrate_row(path: Path) -> str:
    """Bring one row file to today's key; returns what happened (for the log)."""
    table = rows.read_table(path, set_aside=False)
    if table is None:
        return f"unreadable, left alone: {path}"
    row = table.to_pylist()[0]
    config = json.loads(row["config_json"])
    fingerprint = run_keys.data_fingerprint(config)
    key = run_keys.run_key(config, fingerprint)
    if row["run_key"] == key and row["data_fingerprint"] == fingerprint:
        return f"current: {path}"
    if v1_run_key(config) != row["run_key"] or path.stem != row["run_key"]:
        return f"its config does not give its key under the old scheme, left alone: {path}"
    if fingerprint is not None and not all(f.exists() for f in run_keys.split_files(config).values()):
        return f"data files missing under data.dir={config['data']['dir']!r}, left alone: {path}"
    old_artifacts, new_artifacts = path.with_suffix(""), path.with_name(key)
    if old_artifacts.is_dir() and not new_artifacts.exists():
        old_artifacts.rename(new_artifacts)
    row.update(run_key=key, data_fingerprint=fingerprint)
    atomic_write_parquet(pa.Table.from_pylist([row], schema=rows.SCHEMA).to_pandas(),
                         path.with_name(f"{key}.parquet"), rows.SCHEMA)
    path.unlink()
    return f"{row['sweep']}: {path.stem} -> {key}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="results folders (a sweep folder, or a folder of sweeps)")
    args = parser.parse_args(argv)
    files = []
    for folder in map(Path, args.folders):
        files += sorted(folder.glob("runs/*.parquet")) + sorted(folder.glob("*/runs/*.parquet"))
    outcomes = [migrate_row(path) for path in files]
    moved = [o for o in outcomes if not o.startswith(("current", "unreadable", "its config", "data files"))]
    for outcome in outcomes:
        if not outcome.startswith("current"):
            print(outcome)
    print(f"{len(files)} rows: {len(moved)} migrated, {sum(o.startswith('current') for o in outcomes)} current, "
          f"{len(files) - len(moved) - sum(o.startswith('current') for o in outcomes)} left alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
