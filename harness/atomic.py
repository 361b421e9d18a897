"""Write-then-rename, so that nothing half-written is ever read back.

A file or a folder is written under a temporary name beside its final one and renamed into place when complete:
a reader (another process, another machine sharing the folder, or the next run after a kill) sees all of it or
nothing. The row store (harness/rows.py) writes its rows this way, harness/run.py a run's history and predictions,
the data loading (harness/tasks/base.py) its token cache and harness/models.py the tiny_bpe tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_parquet(df: pd.DataFrame, path: Path, schema: pa.Schema | None = None,
                         delta_encoded: tuple[str, ...] = ()) -> None:
    """`df` as Parquet at `path`, written whole or not at all (`atomic_write_table`)."""
    atomic_write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path, delta_encoded)


def atomic_write_table(table: pa.Table, path: Path, delta_encoded: tuple[str, ...] = ()) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see all of it or nothing.

    Compact, because results are committed to git: no pandas or Arrow schema copy in the footer and no column
    statistics (a one-row file with a hundred columns is 12 KB instead of 55; readers cast to `rows.SCHEMA`), zstd,
    and `delta_encoded` integer columns (sorted ids) stored as differences."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table = table.replace_schema_metadata(None)
    try:
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", store_schema=False, write_statistics=False,
                           use_dictionary=[name for name in table.column_names if name not in delta_encoded],
                           column_encoding=dict.fromkeys(delta_encoded, "DELTA_BINARY_PACKED") or None)
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
