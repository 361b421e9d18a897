"""Write-then-rename (harness/atomic.py): published cache folders are complete and never mixed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.atomic import publish_folder

from conftest import REPO


def test_two_processes_publishing_one_cache_folder_never_mix_their_files(tmp_path):
    """The tokenizer and token caches: a second process publishes the folder while the first is half-way
    through writing it. The first's rename then fails quietly; the folder is the second's, complete and alone."""
    folder = tmp_path / "cache" / "tiny_bpe-abc"
    other = ("from pathlib import Path\nfrom harness.atomic import publish_folder\n"
             "publish_folder(Path(%r), lambda tmp: (tmp.mkdir(parents=True), (tmp / 'b.txt').write_text('theirs')))"
             % str(folder))

    def write_half_then_let_the_other_process_finish(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "a.txt").write_text("ours, first half")
        subprocess.run([sys.executable, "-c", other], cwd=REPO, check=True, timeout=120)
        (tmp / "c.txt").write_text("ours, second half")

    assert publish_folder(folder, write_half_then_let_the_other_process_finish) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left

    def fail_half_way(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a failed writer leaves nothing behind
        publish_folder(tmp_path / "cache" / "x", fail_half_way)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
