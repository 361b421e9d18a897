"""Startup output: `--help` that shows how to use the harness, and no third-party noise before what we print."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from harness import models, rows
from harness.run import run

from conftest import CONF_DIR, REPO

NOISE = re.compile(r"torchao|LOAD REPORT|deprecat", re.IGNORECASE)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def harness_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_help_names_the_program_shows_five_example_commands_that_compose_and_lists_the_config_groups():
    shown = harness_command("-m", "harness", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("harness: ") and "powered by Hydra" not in shown.stdout
    assert not NOISE.search(shown.stdout + shown.stderr), shown.stderr
    examples_section = shown.stdout.split("== Examples ==")[1].split("== Configuration groups ==")[0]
    examples = [shlex.split(line) for line in examples_section.splitlines() if "python -m harness" in line]
    assert len(examples) == 5
    assert re.search(r"^variant: .*\blora\b.*\bqlora\b", shown.stdout, re.MULTILINE)
    assert re.search(r"^model: .*\bminilm\b", shown.stdout, re.MULTILINE)
    for words in examples:  # every example's overrides still compose (report takes a folder, not overrides)
        module = words[words.index("-m") + 1]
        if module in ("harness", "harness.inspect"):
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                compose(config_name="config", overrides=words[words.index("-m") + 2:])


@pytest.mark.slow
def test_hydras_own_help_is_still_there():
    hydra_help = harness_command("-m", "harness", "--hydra-help")
    assert hydra_help.returncode == 0 and "== Flags ==" in hydra_help.stdout


@pytest.mark.slow
def test_a_config_typo_fails_with_hydras_message_and_nothing_before_it():
    typo = harness_command("-m", "harness", "variant=lroa")
    assert typo.returncode != 0
    assert typo.stderr.startswith("In 'config': Could not find 'variant/lroa'"), typo.stderr
    assert not NOISE.search(typo.stdout + typo.stderr)


def test_torchao_is_imported_only_for_a_quantized_base_and_says_nothing_when_it_is(tiny_data_dir):
    script = f"""
import sys
from harness.inspect import compose_config, inspect
common = ["model=tiny_roberta", "task=rte", "data.dir={tiny_data_dir}"]
inspect(compose_config(common + ["variant=lora"]))
print("after lora: torchao imported", "torchao" in sys.modules)
inspect(compose_config(common + ["variant=qlora"]))
print("after qlora: torchao imported", "torchao" in sys.modules)
"""
    built = harness_command("-c", script)
    assert built.returncode == 0, built.stderr
    assert "after lora: torchao imported False" in built.stdout
    assert "after qlora: torchao imported True" in built.stdout
    assert not NOISE.search(built.stderr), built.stderr  # torchao's kernel libraries, torch's _pytree notice


@pytest.mark.slow
def test_inspecting_minilm_prints_no_load_report_torchao_or_deprecation_lines():
    inspected = harness_command("-m", "harness.inspect", "model=minilm", "variant=lora", "task=rte")
    assert inspected.returncode == 0, inspected.stderr
    assert "targeted modules (12)" in inspected.stdout
    assert not NOISE.search(inspected.stdout + inspected.stderr), inspected.stderr


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_messages():
    """What transformers' model-loading logger lets through to its handlers."""
    logger, collect = logging.getLogger("transformers.modeling_utils"), Collect()
    logger.addHandler(collect)
    yield collect.messages
    logger.removeHandler(collect)


@pytest.fixture
def encoder_checkpoint(make_cfg, tmp_path):
    """save(drop=()) -> a tiny pretrained RoBERTa encoder without a task head (less the weights in `drop`), as a
    model config that loads it (model.init=pretrained)."""
    cfg = make_cfg()

    def save(drop: tuple[str, ...] = ()):
        encoder = models.load(cfg.model, "classification", 2, cfg.data.cache_dir, with_tokenizer=False).model.roberta
        folder = tmp_path / "encoder"
        state = {k: v for k, v in encoder.state_dict().items() if k not in drop}
        encoder.save_pretrained(folder, state_dict=state)
        return make_cfg(f"model.source={folder}", "model.init=pretrained").model

    return save


def test_loading_a_pretrained_encoder_holds_back_transformers_load_report_and_notes_the_fresh_head(
        encoder_checkpoint, transformers_messages, caplog):
    model_cfg = encoder_checkpoint()
    with caplog.at_level(logging.DEBUG, logger="harness.models"):
        loaded = models.load(model_cfg, "classification", 2, ".cache/harness", with_tokenizer=False)
    assert loaded.head == ["classifier"]
    assert not [m for m in transformers_messages if "LOAD REPORT" in m or "not initialized" in m]
    notes = [r for r in caplog.records if r.name == "harness.models"]
    assert [(r.levelname, "task head (classifier) starts from fresh weights" in r.getMessage()) for r in notes] == [
        ("DEBUG", True)]


def test_a_weight_missing_outside_the_head_is_still_reported_as_a_warning(encoder_checkpoint, caplog):
    model_cfg = encoder_checkpoint(drop=("encoder.layer.1.attention.self.query.weight",))
    with caplog.at_level(logging.WARNING, logger="harness.models"):
        models.load(model_cfg, "classification", 2, ".cache/harness", with_tokenizer=False)
    assert "1 weights outside the task head are not in the checkpoint" in caplog.text
    assert "roberta.encoder.layer.1.attention.self.query.weight" in caplog.text


def test_a_load_that_fails_lets_transformers_report_through_since_it_explains_why(
        make_cfg, tmp_path, transformers_messages):
    three_labels = models.load(make_cfg().model, "classification", 3, tmp_path, with_tokenizer=False).model
    three_labels.save_pretrained(tmp_path / "three")
    model_cfg = make_cfg(f"model.source={tmp_path / 'three'}", "model.init=pretrained").model
    with pytest.raises(RuntimeError, match="report"):
        models.load(model_cfg, "classification", 2, tmp_path, with_tokenizer=False)
    assert [m for m in transformers_messages if "LOAD REPORT" in m and "MISMATCH" in m]


def test_the_final_log_line_gives_the_score_to_four_decimals(make_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="harness.run"):
        row = run(make_cfg())
    assert row["status"] == "ok"
    final = caplog.records[-1].getMessage()
    assert re.search(rf" ok: accuracy={row['score_selected']:.4f} -> ", final), final


def test_the_final_log_line_gives_the_selected_score_and_the_best_evaluation_apart(make_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="harness.run"):
        cfg = make_cfg("train.selection=heldout", "train.max_steps=6", "train.eval_every_steps=2")
        row = run(cfg)
    assert row["status"] == "ok"
    final = caplog.records[-1].getMessage()
    shown = f" ok: accuracy={row['score_selected']:.4f} at the heldout checkpoint (step {row['selected_step']})"
    assert shown in final, final
    assert final.endswith(f" -> {rows.row_path(cfg.results_dir, cfg.sweep_name, row['run_key'])}"), final


@pytest.mark.parametrize("selection, selected_step, expected", [
    ("eval_best", 20, "accuracy=0.7000"),
    ("heldout", 20, "accuracy=0.7000 at the heldout checkpoint (step 20)"),
    ("heldout", 10, "accuracy=0.6000 at the heldout checkpoint (step 10); best evaluation 0.7000 (step 20)"),
    ("last", 30, "accuracy=0.6500 at the last checkpoint (step 30); best evaluation 0.7000 (step 20)"),
])
def test_the_score_summary_never_shows_a_better_number_than_the_row(selection, selected_step, expected):
    from harness.run import score_summary
    scores = {10: 0.6, 20: 0.7, 30: 0.65}
    row = {"primary_metric": "accuracy", "selection": selection, "score_best": 0.7, "best_step": 20,
           "score_selected": scores[selected_step], "selected_step": selected_step}
    assert score_summary(row) == expected
    assert score_summary({"primary_metric": "accuracy"}) == "accuracy=none"  # no evaluation before the failure
