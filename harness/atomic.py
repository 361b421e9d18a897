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
