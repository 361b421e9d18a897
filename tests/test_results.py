"""Rows and their keys (harness/results.py): atomic row files, published cache folders, run keys."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness import results

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
        "from harness.results import atomic_write_parquet\n"
        "os.replace = lambda src, dst: (print('renaming', src, flush=True), time.sleep(600))\n"
        "atomic_write_parquet(pd.DataFrame({'status': ['ok']}), Path(%r))\n" % str(target)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    word, temporary = proc.stdout.readline().split()
    assert word == "renaming" and Path(temporary).stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Path(temporary).exists() and not target.exists()
    assert results.read_rows(tmp_path / "sweep").empty


def test_two_processes_publishing_one_cache_folder_never_mix_their_files(tmp_path):
    """The tokenizer and token caches: a second process publishes the folder while the first is half-way
    through writing it. The first's rename then fails quietly; the folder is the second's, complete and alone."""
    folder = tmp_path / "cache" / "tiny_bpe-abc"
    other = ("from pathlib import Path\nfrom harness.results import publish_folder\n"
             "publish_folder(Path(%r), lambda tmp: (tmp.mkdir(parents=True), (tmp / 'b.txt').write_text('theirs')))"
             % str(folder))

    def write_half_then_let_the_other_process_finish(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "a.txt").write_text("ours, first half")
        subprocess.run([sys.executable, "-c", other], cwd=REPO, check=True, timeout=120)
        (tmp / "c.txt").write_text("ours, second half")

    assert results.publish_folder(folder, write_half_then_let_the_other_process_finish) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left

    def fail_half_way(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a failed writer leaves nothing behind
        results.publish_folder(tmp_path / "cache" / "x", fail_half_way)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_selection_at_its_default_leaves_existing_run_keys_alone(make_cfg):
    semantic = results.semantic_config(make_cfg("task=rte"))
    assert "selection" not in semantic["train"] and "selection_fraction" not in semantic["data"]
    assert results.semantic_config(make_cfg("train.selection=last"))["train"]["selection"] == "last"


def test_every_committed_row_gets_its_run_key_back_from_its_own_config_and_data():
    """A row's run_key is a function of what it stores: its config_json and its data_fingerprint. Recomputed with
    today's code, each committed row's key is the one it was written under, so no committed sweep runs again."""
    paths = sorted((REPO / "results").glob("*/runs/*.parquet"))
    if not paths:
        pytest.skip("no committed rows")
    for path in paths:
        for row in pq.read_table(path, columns=["run_key", "config_json", "data_fingerprint"]).to_pylist():
            config = json.loads(row["config_json"])
            assert results.run_key(config, row["data_fingerprint"]) == row["run_key"], path
