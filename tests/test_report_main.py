"""python -m harness.report: --check catches an edited table without importing the training stack, a missing
folder is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import report
from harness.report.__main__ import main


def test_check_passes_on_fresh_output_and_fails_after_an_edit(report_rows_dir, report_written, capsys):
    args = [str(report_rows_dir), "--out", str(report_written), "--resamples", "200"]
    assert main([*args, "--check"]) == 0
    table = report_written / "table.md"
    table.write_text(table.read_text().replace("Full FT", "Full fine-tuning", 1))
    assert main([*args, "--check"]) == 1
    out = capsys.readouterr().out
    assert "table.md differs" in out and "-| Full fine-tuning" in out and "+| Full FT" in out
    (report_written / "table.md").unlink()
    assert main([*args, "--check"]) == 1
    assert "table.md missing" in capsys.readouterr().out


def test_empty_results_folder_says_how_to_fix_it(tmp_path, capsys):
    with pytest.raises(report.ReportError, match=r"no results rows under .*python -m harness \+sweep=smoke"):
        report.load(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(report.ReportError, match="--out"):
        report.write_report([tmp_path, tmp_path])


TRAINING_STACK = ("torch", "transformers", "peft", "torchao", "datasets", "harness.run", "harness.train",
                  "harness.inspect", "harness.adapters", "harness.models")


def test_check_does_not_import_the_training_stack(report_rows_dir, report_written):
    """The report is a function of the committed rows and data files: CI's --check needs no model code."""
    script = ("import sys; from harness.report.__main__ import main; "
              f"code = main([{str(report_rows_dir)!r}, '--out', {str(report_written)!r}, '--resamples', '200', "
              "'--check']); "
              f"print(code, [name for name in {TRAINING_STACK!r} if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout


def test_check_scores_at_the_selection_the_report_was_written_with(report_rows_dir, tmp_path, capsys):
    """A report written with --selection last is checked with --selection last: without it --check regenerates
    the papers' eval_best table, says it differs and that the report may have been written with other options."""
    args = [str(report_rows_dir), "--out", str(tmp_path / "last"), "--resamples", "200"]
    assert main([*args, "--selection", "last", "--no-plots"]) == 0
    assert main([*args, "--selection", "last", "--check"]) == 0
    capsys.readouterr()
    assert main([*args, "--check"]) == 1
    out = capsys.readouterr().out
    assert "table.md differs" in out and "other options than --selection eval_best" in out
    assert f"python -m harness.report {report_rows_dir} --out {tmp_path / 'last'} --resamples 200`" in out
