"""The row store (harness/rows.py): a row file is complete or absent, never half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import rows

from conftest import REPO


def test_killed_writer_leaves_no_readable_partial_row(tmp_path):
    """SIGKILL a writer after its temporary file is complete but before the rename: nothing is read as a row.

    The writer's rename is held (it prints and sleeps instead) so the kill lands at the worst moment every time.
    """
    target = tmp_path / "sweep" / "runs" / "abc.parquet"
    script = (
        "import os, time\n"
        "import pandas as pd\n"
        "from pathlib import Path\n"
        "from harness.atomic import atomic_write_parquet\n"
        "os.replace = lambda src, dst: (print('renaming', src, flush=True), time.sleep(600))\n"
        "atomic_write_parquet(pd.DataFrame({'status': ['ok']}), Path(%r))\n" % str(target)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    word, temporary = proc.stdout.readline().split()
    assert word == "renaming" and Path(temporary).stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Path(temporary).exists() and not target.exists()
    assert rows.read_rows(tmp_path / "sweep").empty


def test_a_row_is_written_compactly_and_reads_back_whole(tmp_path):
    """Rows are committed to git by the hundred: the file carries no schema copies or column statistics (a
    committed cpu_glue row was 55 KB that way, 15 KB without), and every value comes back."""
    committed = sorted((REPO / "results" / "cpu_glue" / "runs").glob("*.parquet"))
    if not committed:
        pytest.skip("no committed rows")
    row = rows.read_row(committed[0])
    path = rows.write_row(tmp_path, "x", row)
    assert path.stat().st_size < 20_000
    again = rows.read_row(path)
    assert again.keys() == row.keys()
    for column, value in row.items():
        assert again[column] == value or (value != value and again[column] != again[column]), column  # NaN
