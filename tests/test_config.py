"""The conf/ YAMLs: every file composes into a config, and the default config is the one the README describes."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, REPO

CONF_GROUPS = ["model", "task", "variant", "train"]


@pytest.mark.parametrize("group,name", [(g, p.stem) for g in CONF_GROUPS for p in sorted((REPO / "conf" / g).glob("*.yaml"))])
def test_every_conf_file_composes_and_starts_with_a_command(group, name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={name}"])
    if group != "train":
        assert cfg[group].name == name
    first_line = (REPO / "conf" / group / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# python -m harness"), first_line


def test_default_config_is_roberta_base_lora_on_a_hub_glue_task():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config")
    assert cfg.model.source == "FacebookAI/roberta-base" and cfg.task.hub_id == "nyu-mll/glue"
    assert cfg.variant.name == "lora" and list(cfg.variant.targets) == ["query", "value"] and cfg.variant.r == 8
