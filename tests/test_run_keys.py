"""Run keys (harness/run_keys.py): a setting at its default leaves keys alone; every committed row keeps its key."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from harness import run_keys

from conftest import REPO


def test_selection_at_its_default_leaves_existing_run_keys_alone(make_cfg):
    semantic = run_keys.semantic_config(make_cfg("task=rte"))
    assert "selection" not in semantic["train"] and "selection_fraction" not in semantic["data"]
    assert run_keys.semantic_config(make_cfg("train.selection=last"))["train"]["selection"] == "last"


def test_every_committed_row_gets_its_run_key_back_from_its_own_config_and_data():
    """A row's run_key is a function of what it stores: its config_json and its data_fingerprint. Recomputed with
    today's code, each committed row's key is the one it was written under, so no committed sweep runs again."""
    paths = sorted((REPO / "results").glob("*/runs/*.parquet"))
    if not paths:
        pytest.skip("no committed rows")
    for path in paths:
        for row in pq.read_table(path, columns=["run_key", "config_json", "data_fingerprint"]).to_pylist():
            config = json.loads(row["config_json"])
            assert run_keys.run_key(config, row["data_fingerprint"]) == row["run_key"], path
