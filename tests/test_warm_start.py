"""init_from: a run starts from another run's trained adapter (the LoRA paper's MNLI warm start for MRPC, RTE, STS-B).

Tiny random RoBERTa on the tiny data; MNLI trains with data.protocol=holdout (its train split is not local here)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import adapters, rows, run_keys, sweep, warm_start
from harness import run as run_module
from harness.errors import ConfigError, HarnessError
from harness.train import TrainingLoop

MNLI = ["task=mnli", "data.protocol=holdout"]


def adapter_tensors(model, head) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and not adapters.base.is_under(n, head)}


def test_rte_starts_from_the_mnli_runs_adapter_and_its_run_key_includes_mnlis(make_cfg, monkeypatch):
    source = run_module.run(make_cfg(*MNLI))
    assert source["status"] == "ok", source.get("error")
    saved = rows.artifacts_dir(make_cfg().results_dir, "default", source["run_key"])
    checkpoint = saved / ("adapter_best.safetensors" if (saved / "adapter_best.safetensors").exists()
                          else "adapter.safetensors")
    mnli_adapter = {n: t for n, t in load_file(str(checkpoint)).items() if not n.startswith("classifier")}

    seen = {}
    real_run = TrainingLoop.run

    def train_and_record_the_start(loop):
        model = loop.setup.model
        seen["start"] = adapter_tensors(model, loop.setup.head)
        seen["head"] = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier")}
        return real_run(loop)

    monkeypatch.setattr(TrainingLoop, "run", train_and_record_the_start)
    cold = make_cfg("task=rte")
    warm = make_cfg("task=rte", "init_from=mnli")
    row = run_module.run(warm)
    assert row["status"] == "ok", row.get("error")
    assert row["init_from"] == source["run_key"]
    assert row["run_key"] == run_keys.run_key(warm_start.resolve(warm)) != run_keys.run_key(cold)
    assert set(seen["start"]) == set(mnli_adapter) and mnli_adapter
    for name, tensor in mnli_adapter.items():
        assert torch.equal(seen["start"][name], tensor), name
    assert seen["head"]["classifier.out_proj.weight"].shape[0] == 2  # RTE's own fresh 2-label head, not MNLI's 3
    # the same source named by its run_key gives the same run
    assert run_keys.run_key(make_cfg("task=rte", f"init_from={source['run_key']}")) == row["run_key"]


def test_a_missing_source_is_a_clear_error_that_names_it(make_cfg):
    with pytest.raises(ConfigError, match=r"init_from=task=mnli: no ok row of its source \(task=mnli variant=lora "
                                          r"rank=8 seed=0 model=tiny_roberta\)"):
        run_module.run(make_cfg("task=rte", "init_from=mnli"))
    with pytest.raises(HarnessError, match=r"init_from=0123456789abcdef: the source run has no row"):
        run_module.run(make_cfg("task=rte", "init_from=0123456789abcdef"))  # checked before anything loads


def test_a_failed_source_fails_its_user_with_the_sources_key_and_status(make_cfg):
    source = run_module.run(make_cfg(*MNLI, "train.lr=1e12"))  # blows up in training: a row that is not ok
    assert source["status"] in ("failed", "diverged"), source["status"]
    with pytest.raises(HarnessError, match=rf"init_from={source['run_key']}: the source run \(task=mnli .*\) ended "
                                           rf"{source['status']}"):
        run_module.run(make_cfg("task=rte", f"init_from={source['run_key']}"))


def test_a_source_without_a_saved_adapter_or_of_another_variant_is_refused(make_cfg):
    source = run_module.run(make_cfg(*MNLI, "save_adapter=false"))
    with pytest.raises(HarnessError, match="save_adapter=true"):
        run_module.run(make_cfg("task=rte", f"init_from={source['run_key']}"))
    with pytest.raises(HarnessError, match="same adapter"):
        run_module.run(make_cfg("task=rte", "variant=dora", f"init_from={source['run_key']}"))


def test_a_source_trained_on_other_weights_at_the_models_path_is_refused(make_cfg, tmp_path):
    """The model folder's files were replaced after the source trained (same path, so the same run_keys): its
    adapter belongs to the old weights, and the run says so instead of starting from it."""
    import time

    from harness import models

    folder = tmp_path / "encoder"
    local = [f"model.source={folder}", "model.init=pretrained"]
    encoder = models.load(make_cfg().model, "classification", 2, make_cfg().data.cache_dir, with_tokenizer=False).model
    encoder.roberta.save_pretrained(folder)  # the base model: each task's run adds its own head
    source = run_module.run(make_cfg(*MNLI, *local))
    assert source["status"] == "ok" and source["model_fingerprint"]
    assert run_module.run(make_cfg("task=rte", *local, f"init_from={source['run_key']}"))["status"] == "ok"
    with torch.no_grad():
        encoder.roberta.embeddings.word_embeddings.weight.mul_(2)
    time.sleep(0.01)
    encoder.roberta.save_pretrained(folder)
    with pytest.raises(HarnessError, match=rf"init_from={source['run_key']}: the source run \(task=mnli\) trained on "
                                           r"other files than .* rerun it first"):
        run_module.run(make_cfg("task=rte", "seed=1", *local, f"init_from={source['run_key']}"))


def test_init_from_that_names_nothing_is_a_config_error(make_cfg):
    for value in ("'task=mnli;rm'", "12"):
        with pytest.raises(ConfigError, match="names no run"):
            warm_start.resolve(make_cfg("task=rte", f"init_from={value}"))
    with pytest.raises(ConfigError, match="its own task"):
        warm_start.resolve(make_cfg("task=rte", "init_from=rte"))


def test_init_from_at_its_default_leaves_existing_run_keys_alone(make_cfg):
    cfg = make_cfg("task=rte")
    semantic = run_keys.semantic_config(cfg)
    assert "init_from" not in semantic and "frozen" not in semantic["variant"]
    assert "frozen" not in run_keys.semantic_config(make_cfg("variant=dylora", "variant.frozen=false"))["variant"]
    assert run_keys.semantic_config(make_cfg("variant=dylora"))["variant"]["frozen"] is True


def test_sources_run_in_an_earlier_wave_than_the_runs_that_start_from_them():
    states = [sweep.JobState(["a"], "k_rte", "todo", source="k_mnli"), sweep.JobState(["b"], "k_mnli", "todo"),
              sweep.JobState(["c"], "k_sst2", "todo"), sweep.JobState(["d"], "k_mrpc", "todo", source="k_done")]
    waves = [[s.run_key for s in wave] for wave in sweep.dependency_waves(states)]
    assert waves == [["k_mnli"], ["k_rte", "k_sst2", "k_mrpc"]]  # k_done has a row already: no wait
    # seeds outermost: a wave ends only where a job needs one of its own, so seed 0 finishes before seed 1 starts
    # its warm-started runs
    grid = [sweep.JobState([], f"{task}{seed}", "todo", source=f"mnli{seed}" if task == "mrpc" else None)
            for seed in (0, 1) for task in ("mnli", "cola", "mrpc")]
    waves = [[s.run_key for s in wave] for wave in sweep.dependency_waves(grid)]
    assert waves == [["mnli0", "cola0"], ["mrpc0", "mnli1", "cola1"], ["mrpc1"]]
    with pytest.raises(ConfigError, match="cycle"):
        sweep.dependency_waves([sweep.JobState(["a"], "x", "todo", source="y"),
                                sweep.JobState(["b"], "y", "todo", source="x")])


WARM_SWEEP = """# @package _global_
# python -m harness +sweep=warm   (a test sweep: RTE listed first still runs after the MNLI run it starts from)
defaults:
  - override /hydra/sweeper: harness
  - override /model: tiny_roberta

hydra:
  mode: MULTIRUN
  sweeper:
    params:
      task: rte,mnli
      variant: lora
      variant.r: 4
      seed: 0
    when:
      task=mnli: [data.protocol=holdout{mnli_extra}]
      task=rte: [init_from=mnli]

sweep_name: warm
device: cpu
data:
  max_train_samples: 32
  max_eval_samples: 16
task:
  max_seq_len: 64
train:
  max_steps: 3
  batch_size: 8
  eval_batch_size: 16
"""


def write_sweep(tmp_path: Path, mnli_extra: str = "") -> str:
    folder = tmp_path / "extra_conf" / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "warm.yaml").write_text(WARM_SWEEP.format(mnli_extra=mnli_extra))
    return f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]"


@pytest.mark.slow
def test_a_sweep_over_mnli_and_rte_trains_mnli_first_and_rte_from_it(harness_cli, tmp_path):
    searchpath = write_sweep(tmp_path)
    done = harness_cli(searchpath, sweep="warm")
    assert done.returncode == 0, done.stderr
    found = rows.read_rows(harness_cli.results / "warm").set_index("task")
    assert found.loc["rte", "init_from"] == found.loc["mnli", "run_key"]
    logs = "\n".join(p.read_text() for p in sorted((harness_cli.results / "warm").glob("logs/*/*/__main__.log")))
    started = re.findall(r"\brun ([0-9a-f]{16}): task=(\w+)", logs)
    finished_mnli = logs.index(f"run {found.loc['mnli', 'run_key']} ok")
    assert [task for _, task in started] == ["mnli", "rte"]
    assert logs.index(f"run {found.loc['rte', 'run_key']}: task=rte") > finished_mnli
    listing = harness_cli(searchpath, "dry_run=true", sweep="warm")
    assert listing.stdout.count("\tok\t") == 2  # resumable: both keys are the same on the next sitting

    # a later sitting (a fresh clone: rows kept by git, adapters not) with RTE still to run: MNLI runs again first
    mnli_key, rte_key = found.loc["mnli", "run_key"], found.loc["rte", "run_key"]
    shutil.rmtree(rows.artifacts_dir(harness_cli.results, "warm", mnli_key))
    rows.row_path(harness_cli.results, "warm", rte_key).unlink()
    listing = harness_cli(searchpath, "dry_run=true", sweep="warm")
    assert f"no_adapter\t{mnli_key}" in listing.stdout and f"todo\t{rte_key}" in listing.stdout
    again = harness_cli(searchpath, sweep="warm")
    assert again.returncode == 0, again.stderr
    found = rows.read_rows(harness_cli.results / "warm").set_index("task")
    assert found.loc["mnli", "status"] == found.loc["rte", "status"] == "ok"
    assert found.loc["rte", "init_from"] == mnli_key and rows.adapter_file(harness_cli.results, "warm", mnli_key)


def test_an_ok_source_without_its_adapter_runs_again_only_while_a_job_needs_it():
    def states(rte_status: str, mnli_adapter: bool):
        return [sweep.JobState(["task=mnli"], "k_mnli", "ok", has_adapter=mnli_adapter),
                sweep.JobState(["task=rte"], "k_rte", rte_status, source="k_mnli", has_adapter=True)]

    mnli, _ = sweep.rerun_sources_without_adapter(states("todo", mnli_adapter=False))
    assert (mnli.status, mnli.done, mnli.overrides) == ("no_adapter", False, ["task=mnli", "rerun=true"])
    for rte_status, mnli_adapter in (("ok", False), ("todo", True)):
        mnli, _ = sweep.rerun_sources_without_adapter(states(rte_status, mnli_adapter))
        assert (mnli.status, mnli.overrides) == ("ok", ["task=mnli"])


def test_rerun_true_runs_again_over_an_ok_row_and_keeps_its_key(make_cfg):
    first = run_module.run(make_cfg("task=rte"))
    assert run_module.run(make_cfg("task=rte"))["wall_seconds"] == first["wall_seconds"]  # skipped: the same row
    again = run_module.run(make_cfg("task=rte", "rerun=true"))
    assert again["run_key"] == first["run_key"] and again["status"] == "ok"
    assert again["wall_seconds"] != first["wall_seconds"]


def test_a_rerun_stopped_before_training_keeps_the_ok_row_and_its_files(make_cfg):
    """rerun=true replaces a run's row and files only once it is about to train: an error found before (here the
    device, which is not in the key) leaves the ok row with its own history and predictions."""
    cfg = make_cfg("task=rte")
    first = run_module.run(cfg)
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, first["run_key"])
    before = (artifacts / "history.parquet").read_bytes()
    with pytest.raises(ConfigError, match="device"):
        run_module.run(make_cfg("task=rte", "rerun=true", "device=cuda:99"))
    kept = rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, first["run_key"]))
    assert rows.is_done(kept) and kept["wall_seconds"] == first["wall_seconds"]
    assert (artifacts / "history.parquet").read_bytes() == before and (artifacts / "predictions.parquet").exists()


def test_rerun_true_makes_a_sweep_job_with_an_ok_row_run_again(make_cfg):
    run_module.run(make_cfg("task=rte"))
    assert sweep.job_state(make_cfg("task=rte"), []).done
    state = sweep.job_state(make_cfg("task=rte", "rerun=true"), ["rerun=true"])
    assert (state.status, state.done) == ("rerun", False)
    assert sweep.todo_jobs("warm", [state]) == [state]


@pytest.mark.slow
def test_a_sweep_whose_source_fails_records_its_users_error_naming_the_source(harness_cli, tmp_path):
    diverges = ", train.lr=1e12, train.max_grad_norm=null, train.schedule=constant, train.warmup_ratio=0"
    done = harness_cli(write_sweep(tmp_path, mnli_extra=diverges), sweep="warm")
    assert done.returncode != 0
    found = rows.read_rows(harness_cli.results / "warm").set_index("task")
    assert found.loc["mnli", "status"] == "diverged" and "rte" not in found.index  # no run: an error before training
    errors = "\n".join(p.read_text() for p in (harness_cli.results / "warm").glob("logs/*/*/error.txt"))
    assert f"SourceUnavailable: init_from={found.loc['mnli', 'run_key']}" in errors and "ended diverged" in errors
