"""Writing a report: every output and plot is report_written, the README shows the committed table, the notebook
runs headless on the same functions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness import report

REPO = Path(__file__).resolve().parent.parent


def test_outputs_and_plots_are_written(report_rows_dir, tmp_path):
    out = report.write_report([report_rows_dir], tmp_path / "report", resamples=100)
    for name in ("table", "efficiency", "param_counts"):
        for suffix in (".md", ".tex"):
            assert (out / f"{name}{suffix}").stat().st_size > 0
    for name in ("score_vs_rank", "score_vs_params", "efficiency", "training_curves"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (out / "plots" / f"{name}.svg").read_bytes()[:2000]
        assert f"](plots/{name}.png)" in (out / "README.md").read_text()
    assert not (out / "plots" / "rank_curve.png").exists()  # no DyLoRA rows here
    efficiency = pd.read_csv(out / "efficiency.csv")
    assert (efficiency.train_samples_per_s > 0).all() and (efficiency.account_bytes > 0).all()


def test_readme_shows_the_committed_table():
    """The README's headline table is the committed cpu_glue_v2 table at the honest selection (heldout), row for
    row: a regenerated report must be pasted again (its caption lives in the report; the README says in its own
    words how to read it)."""
    table = REPO / "results" / "cpu_glue_v2" / "report_heldout" / "table.md"
    rows = "\n".join(line for line in table.read_text().splitlines() if line.startswith("|"))
    assert rows and rows in (REPO / "README.md").read_text(), (
        "README.md's results table differs from results/cpu_glue_v2/report_heldout/table.md: paste the table's "
        "rows into the README's Results section")


@pytest.mark.slow
def test_notebook_runs_headless(report_rows_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = REPO / "notebooks" / "compare_variants.ipynb"
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("HARNESS_REPORT_DIRS", str(report_rows_dir))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("Full FT" in o.get("data", {}).get("text/markdown", "") for o in outputs)
