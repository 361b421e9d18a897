"""Compute not spent on padding: length-grouped training batches, evaluation in length order, the padding and
time columns of the row, and train.precision=auto."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, merged_and_composed
from harness import adapters, models, rows, run_keys, tasks
from harness.atomic import atomic_write_parquet
from harness.assemble import assemble, read_splits
from harness.run import run
from harness.train import LengthGroupedBatches, bf16_supported, concrete_precision, predict, sequence_lengths


def skewed_lengths(n: int = 1000, seed: int = 0) -> np.ndarray:
    """Lengths like SST-2's: mostly short, a long tail."""
    return np.clip(np.random.default_rng(seed).lognormal(2.5, 0.6, size=n).astype(int), 2, 128)


def padding_of(batches, lengths) -> float:
    padded = sum(len(b) * lengths[b].max() for b in map(np.asarray, batches))
    return padded / lengths.sum()


def test_length_grouped_batches_cover_every_example_once_per_epoch_in_full_batches():
    lengths = skewed_lengths(1000)
    sampler = LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 32  # ceil(1000 / 32)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches)[1:] == [32] * 31  # one partial batch: 1000 = 31 * 32 + 8
    assert min(len(b) for b in batches) == 8


def test_length_grouped_batches_cut_padding_and_keep_a_random_batch_order():
    lengths = skewed_lengths(3200)
    grouped = list(LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(0)))
    shuffled = np.random.default_rng(0).permutation(3200).reshape(100, 32)
    assert padding_of(grouped, lengths) < 1.15 < 1.5 < padding_of(shuffled, lengths)
    longest = [lengths[b].max() for b in map(np.asarray, grouped)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # batch order is shuffled


def test_length_grouped_batches_are_fixed_by_the_seed_and_differ_between_epochs():
    lengths = skewed_lengths(500)
    first = LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(3))
    second = LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(3))
    epoch_1, epoch_2 = list(first), list(first)
    assert epoch_1 == list(second) and epoch_2 == list(second)
    assert epoch_1 != epoch_2
    assert list(LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(4))) != epoch_1


def build_for_prediction(cfg):
    setup = assemble(cfg)
    for _, layer in adapters.adapter_layers(setup.model):
        torch.nn.init.normal_(layer.lora_B)  # an adapter that changes the outputs
    return setup, setup.task, read_splits(cfg, setup).evals["validation"]


@pytest.mark.parametrize("task_name", ["rte", "stsb"])
def test_evaluation_in_length_order_gives_the_outputs_of_dataset_order(make_cfg, task_name):
    cfg = make_cfg(f"task={task_name}", "train.eval_batch_size=7")
    setup, task, dataset = build_for_prediction(cfg)
    collate = task.collate(setup.tokenizer)
    cpu = torch.device("cpu")
    ordered = predict(setup.model, task, dataset, collate, cfg.train, cpu, None, in_length_order=True)
    plain = predict(setup.model, task, dataset, collate, cfg.train, cpu, None, in_length_order=False)
    np.testing.assert_array_equal(ordered.outputs["idx"], np.asarray(dataset["idx"]))
    np.testing.assert_array_equal(ordered.outputs["idx"], plain.outputs["idx"])
    np.testing.assert_array_equal(ordered.outputs["label"], plain.outputs["label"])
    if task_name == "stsb":
        np.testing.assert_allclose(ordered.outputs["prediction"], plain.outputs["prediction"], rtol=1e-5, atol=1e-5)
        assert not np.allclose(plain.outputs["prediction"], plain.outputs["prediction"][0])  # not a constant
    else:
        np.testing.assert_array_equal(ordered.outputs["prediction"], plain.outputs["prediction"])
    metrics = [task.score("validation", dataset, p.outputs)[0] for p in (ordered, plain)]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-5)  # float sums in another batch shape
    assert ordered.tokens == plain.tokens == int(sequence_lengths(dataset).sum())
    assert ordered.padded_tokens < plain.padded_tokens


def test_group_by_length_trains_with_accumulation_and_records_less_padding(make_cfg):
    plain = run(make_cfg("task=sst2", "train.max_steps=6", "train.batch_size=4", "train.grad_accum=2"))
    grouped = run(make_cfg("task=sst2", "train.max_steps=6", "train.batch_size=4", "train.grad_accum=2",
                           "train.group_by_length=true"))
    assert plain["status"] == grouped["status"] == "ok", (plain["error"], grouped["error"])
    assert grouped["steps"] == plain["steps"] == 6
    assert 1.0 <= grouped["train_padding_ratio"] < plain["train_padding_ratio"]
    assert 1.0 <= grouped["eval_padding_ratio"] == plain["eval_padding_ratio"]  # evaluation is the same either way
    assert grouped["run_key"] != plain["run_key"]


def test_group_by_length_off_keeps_the_run_key_of_configs_without_it(make_cfg):
    from omegaconf import open_dict

    cfg = make_cfg()
    without = make_cfg()
    with_off = run_keys.semantic_config(cfg)
    with open_dict(without):
        del without.train["group_by_length"]
    assert with_off == run_keys.semantic_config(without)
    assert run_keys.run_key(cfg) == run_keys.run_key(without)


def test_group_by_length_must_be_a_boolean(make_cfg):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="train.group_by_length='sometimes' is not allowed: true or false"):
        run(make_cfg("train.group_by_length=sometimes"))


def test_the_row_accounts_for_time_outside_training(make_cfg):
    row = run(make_cfg("train.max_steps=3"))
    assert row["status"] == "ok", row["error"]
    assert 0 < row["setup_seconds"] < row["wall_seconds"]
    assert row["setup_seconds"] + row["train_seconds"] + row["eval_seconds"] <= row["wall_seconds"]


def test_the_first_run_of_a_process_is_charged_its_start_but_not_a_sweeps_setup(make_cfg, monkeypatch):
    """A sweep on Hydra's basic launcher composes and checks its whole grid (seconds to minutes), then runs its jobs
    in the same process: the first run pays the process's imports, not the grid (harness_sweeper.sweep)."""
    import time

    from harness import run as run_module

    monkeypatch.setattr(run_module, "_charged_process_start", False)
    monkeypatch.setattr(run_module, "_left_out_seconds", 0.0)
    monkeypatch.setattr(run_module, "process_start_time", lambda: time.time() - 100)  # started 100 s ago
    run_module.leave_out_of_first_run(60)  # of which the sweep's own setup took 60
    first = run(make_cfg("train.max_steps=2"))
    assert 40 <= first["setup_seconds"] < 60
    assert run(make_cfg("train.max_steps=2", "seed=1"))["setup_seconds"] < 30  # later runs: from their own call


def test_a_process_knows_its_start_to_the_clock_tick():
    """The first run of a process is charged from the process's start; /proc's boot time is whole seconds, so a
    start computed from it can be up to a second early."""
    import subprocess
    import sys
    import time

    script = "import time; now = time.time(); from harness.run import process_start_time as s; print(s(), now)"
    before = time.time()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    started, first_statement = map(float, done.stdout.split())
    assert before - 0.03 <= started <= first_statement  # ticks and uptime are 10 ms apiece


def test_seeding_leaves_every_generator_as_transformers_set_seed_does():
    import random

    from transformers import set_seed

    from harness.assemble import seed_everything

    def states():
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda

    random.random(), np.random.rand(), torch.rand(1)
    seed_everything(7)
    ours = states()
    random.random(), np.random.rand(), torch.rand(1)
    set_seed(7)
    theirs = states()
    assert ours[0] == theirs[0] and torch.equal(ours[2], theirs[2])
    assert all(np.array_equal(a, b) for a, b in zip(ours[1], theirs[1]))
    assert all(torch.equal(a, b) for a, b in zip(ours[3], theirs[3]))


def test_a_run_of_our_layers_never_imports_peft_or_the_trainer(make_cfg, tmp_path):
    """A run of our layers needs neither peft nor the Trainer's utilities (`transformers.trainer_utils`), 0.1 s of
    its start: a fresh process runs one job and says which of them it imported."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    OmegaConf.save(make_cfg("train.max_steps=2", "variant=lora"), tmp_path / "cfg.yaml")
    script = ("import sys; from omegaconf import OmegaConf; from harness.run import run; "
              f"row = run(OmegaConf.load({str(tmp_path / 'cfg.yaml')!r})); assert row['status'] == 'ok', row; "
              "print(sorted(m for m in ('peft', 'transformers.trainer_utils', 'transformers.trainer') "
              "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_auto_precision_is_bf16_exactly_where_the_device_computes_it_natively(make_cfg):
    cpu = torch.device("cpu")
    assert concrete_precision("auto", cpu) == ("bf16" if bf16_supported(cpu) else "fp32")
    assert concrete_precision("fp32", cpu) == "fp32"
    row = run(make_cfg("train.precision=auto"))
    assert row["status"] == "ok", row["error"]
    assert row["precision"] == concrete_precision("auto", cpu)  # the row says what was computed
    assert '"precision": "auto"' in row["config_json"]  # and the config what was asked


def tokenize_counting(task, tokenizer, raw, calls_file):
    """Tokenize through the task's cache, noting in `calls_file` each time the tokenizer really runs."""
    import time

    def encode(examples):
        with open(calls_file, "a") as handle:
            handle.write("x")
        time.sleep(1.0)  # long enough that the other process asks while this one is still tokenizing
        return task.encode(tokenizer, examples)

    task.cached(tokenizer, "train", raw, encode)


def test_parallel_jobs_tokenize_a_split_once(make_cfg, tmp_path):
    import multiprocessing

    cfg = make_cfg(f"data.cache_dir={tmp_path / 'cache'}")
    task = tasks.get(cfg.task, cfg.data)
    tokenizer = models.load_tokenizer(cfg.model, cfg.data.cache_dir)
    raw, _ = task.train_and_eval_raw()
    calls = tmp_path / "calls"
    context = multiprocessing.get_context("fork")
    jobs = [context.Process(target=tokenize_counting, args=(task, tokenizer, raw, calls)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert calls.read_text() == "x"  # one tokenization; the other job waited and read it from the cache


def test_evaluation_batches_run_longest_first_with_little_padding():
    from harness.train import EVAL_BATCH_LENGTH_SPREAD, longest_first

    lengths = skewed_lengths(900, seed=1)
    dataset = [{"input_ids": [0] * n} for n in lengths]
    batches = longest_first(dataset, 128)
    assert sorted(i for b in batches for i in b) == list(range(900))
    assert all(len(b) <= 128 for b in batches)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] == lengths.max()
    assert all(lengths[b].min() >= EVAL_BATCH_LENGTH_SPREAD * lengths[b[0]] for b in batches)
    assert padding_of(batches, lengths) < 1.10


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_and_composed_adapter_paths_agree_and_the_token_count_picks_one(make_cfg, variant):
    cfg = make_cfg(f"variant={variant}", "variant.dropout=0.0")
    torch.manual_seed(0)
    layer = adapters.build(cfg.variant).make_layer("q", torch.nn.Linear(64, 48).requires_grad_(False))
    torch.nn.init.normal_(layer.lora_B)
    threshold = layer.merged_path_min_tokens
    short = torch.randn(2, 8, 64)
    long = torch.randn(1, threshold, 64)
    assert "Function" not in type(layer(short).grad_fn).__name__  # few tokens: the composed ops
    assert "Function" in type(layer(long).grad_fn).__name__  # from the threshold on: through the merged weight
    x = torch.randn(3, 50, 64, requires_grad=True)
    outputs, grads = merged_and_composed(layer, x)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for merged, composed in zip(*grads):
        torch.testing.assert_close(merged, composed, rtol=1e-4, atol=1e-4)


def test_rows_from_before_the_padding_and_time_columns_read_beside_new_ones(tmp_path):
    import pyarrow as pa

    new_columns = ["train_padding_ratio", "eval_padding_ratio", "wall_seconds", "setup_seconds"]
    old_schema = pa.schema([f for f in rows.SCHEMA if f.name not in new_columns])
    old = {"run_key": "old", "status": "ok", "score_best": 0.5}
    atomic_write_parquet(rows.make_row(old).drop(columns=new_columns), rows.row_path(tmp_path, "s", "old"),
                         old_schema)
    rows.write_row(tmp_path, "s", {"run_key": "new", "status": "ok", "score_best": 0.6, "wall_seconds": 9.0})
    table = rows.read_rows(tmp_path / "s").set_index("run_key")
    assert list(table.reset_index().columns) == [*rows.COLUMNS, "artifacts"]
    assert table.loc["new", "wall_seconds"] == 9.0 and np.isnan(table.loc["old", "wall_seconds"])
