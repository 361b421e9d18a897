"""Display labels come from the YAMLs: every variant and task has a `label:`, the report shows it, and a label
never changes a run_key (committed rows keep theirs)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from harness import run_keys
from harness.adapters import VARIANTS
from harness.report import labels

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("group", ["variant", "task"])
def test_every_variant_and_task_yaml_has_a_label(group):
    files = sorted((REPO / "conf" / group).glob("*.yaml"))
    assert files
    for path in files:
        label = OmegaConf.load(path).get("label")
        assert isinstance(label, str) and label.strip(), f"{path} has no `label:` (its name in tables and plots)"
    assert set(VARIANTS) <= set(labels.config_labels("variant")), "a registered variant has no labelled YAML"


def test_the_report_names_variants_and_tasks_by_their_yaml_label(tmp_path):
    assert labels.variant_label("lora_plus") == OmegaConf.load(REPO / "conf/variant/lora_plus.yaml").label == "LoRA+"
    assert labels.task_label("stsb") == "STS-B" and labels.column_label("stsb", "spearman", False) == "STS-B Spearman"
    (tmp_path / "variant").mkdir()
    (tmp_path / "variant" / "mine.yaml").write_text("name: my_variant\nlabel: My variant\nr: 4\n")
    (tmp_path / "variant" / "plain.yaml").write_text("name: plain\n")
    assert labels.config_labels("variant", tmp_path) == {"my_variant": "My variant"}
    assert labels.variant_label("not_a_variant") == "not_a_variant"  # no YAML: shown by its name


def committed_rows() -> list[tuple[str, dict]]:
    """(run_key, config) of one committed row per sweep, variant and task."""
    seen, out = set(), []
    for path in sorted((REPO / "results").glob("*/runs/*.parquet")):
        row = pq.read_table(path, columns=["run_key", "variant", "task", "config_json"]).to_pylist()[0]
        if (path.parts[-3], row["variant"], row["task"]) not in seen:
            seen.add((path.parts[-3], row["variant"], row["task"]))
            out.append((row["run_key"], json.loads(row["config_json"])))
    return out


def test_labels_are_display_only_committed_rows_keep_their_run_keys():
    rows = committed_rows()
    if not rows:
        pytest.skip("no committed rows")
    for key, config in rows:
        # rows made before labels existed have none; later ones have their YAML's: either way the key is the same
        config["variant"]["label"] = labels.variant_label(config["variant"]["name"])
        config["task"]["label"] = labels.task_label(config["task"]["name"])
        assert run_keys.run_key(OmegaConf.create(config)) == key, (config["variant"]["name"], config["task"]["name"])
        config["variant"]["label"] = "renamed"
        assert run_keys.run_key(OmegaConf.create(config)) == key
