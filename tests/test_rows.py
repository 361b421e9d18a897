"""The row store (harness/rows.py): a row file is complete or absent, never half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from harness import rows


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
