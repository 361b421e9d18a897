"""python -m harness.report: --check catches an edited table, a missing folder is a clear error."""

from __future__ import annotations

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
