"""Sweeps: the grid (rank-free variants once), the job listing, resume after a kill, parallel runs, launchers.

The subprocess tests run `python -m harness +sweep=smoke` (tiny model, tiny data) as a user would. Which runs
were trained is read from the job logs every launcher writes (results/<sweep>/logs/<time>/<job>/__main__.log):
run.py logs `run <key>: ...` when it starts training and `run <key> <status>: ...` when it writes the row.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import wait_for
from harness import rows, sweep
from harness.errors import ConfigError, RunBusy
from harness.sweep import lifecycle, resources, slurm
from harness.train import validate_train

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
RANK_FREE = {"full", "head", "bitfit"}


# ---- helpers -------------------------------------------------------------------------------------------
def listing(stdout: str) -> list[tuple[str, str, str]]:
    """(status, run_key, overrides) per job line of a dry-run listing."""
    return [tuple(line.split("\t")[1:4]) for line in stdout.splitlines() if re.match(r"^\d+\t", line)]


def job_logs(results_dir: Path, skip: frozenset[Path] = frozenset()) -> str:
    """The job logs of every sitting so far, except the log files in `skip` (those of earlier sittings)."""
    return "\n".join(p.read_text() for p in sorted(results_dir.glob("*/logs/*/*/__main__.log")) if p not in skip)


def started(results_dir: Path) -> Counter:
    """How many times each run_key started training, over every sitting."""
    return Counter(re.findall(r"\brun ([0-9a-f]{16}): task=", job_logs(results_dir)))


def finished(results_dir: Path, status: str = "ok") -> Counter:
    return Counter(re.findall(rf"\brun ([0-9a-f]{{16}}) {status}: ", job_logs(results_dir)))


def sweep_rows(results_dir: Path, sweep_name: str = "smoke") -> dict[str, dict]:
    """Every row of the sweep by run_key; reading each file also proves none is half-written."""
    return {r["run_key"]: r for r in (pq.read_table(p).to_pylist()[0]
                                      for p in sorted(rows.runs_dir(results_dir, sweep_name).glob("*.parquet")))}




def fake_rank_used(variant: str) -> bool:
    if variant not in {"lora", "dora", "full", "head"}:
        raise ConfigError(f"variant={variant!r} is not registered")
    return variant not in RANK_FREE


# ---- the grid --------------------------------------------------------------------------------------------
def grid(**axes: list) -> list[list[str]]:
    import itertools

    return [[f"{k}={v}" for k, v in zip(axes, values)] for values in itertools.product(*axes.values())]


def test_rank_free_variants_run_once_per_task_and_seed_not_once_per_rank():
    points = grid(task=["rte", "mrpc"], variant=["lora", "full", "dora", "head"], **{"variant.r": [4, 8, 16]},
                  seed=[0, 1])
    jobs = sweep.expand_jobs(points, "lora", ["variant.r"], rank_used=fake_rank_used)
    assert len(jobs) == 2 * (2 * 3 + 2) * 2 == len({tuple(j) for j in jobs})
    assert ["task=rte", "variant=full", "seed=0"] in jobs
    assert not any("variant.r=" in o for j in jobs for o in j if j[1] in ("variant=full", "variant=head"))
    assert sum(j[1] == "variant=dora" for j in jobs) == 2 * 3 * 2


def test_rank_free_is_read_from_the_variant_registry():
    from harness.adapters import VARIANTS

    assert {name for name, cls in VARIANTS.items() if not cls.uses_rank} == RANK_FREE
    assert all(sweep.uses_rank(name) for name in VARIANTS if name not in RANK_FREE)
    with pytest.raises(ConfigError, match="registered variants: .*lora"):
        sweep.uses_rank("lorra")


def test_when_adds_overrides_to_matching_jobs_replacing_the_same_key():
    points = grid(task=["rte", "cola"], variant=["lora", "full"], **{"train.lr": ["5e-4"]})
    when = {"variant=full": ["recipe=fairseq_roberta", "train.lr=1e-5"], "task=cola": ["train.max_steps=10"]}
    jobs = sweep.expand_jobs(points, "lora", ["variant.r"], when, rank_used=fake_rank_used)
    assert jobs == [["task=rte", "variant=lora", "train.lr=5e-4"],
                    ["task=rte", "variant=full", "recipe=fairseq_roberta", "train.lr=1e-5"],
                    ["task=cola", "variant=lora", "train.lr=5e-4", "train.max_steps=10"],
                    ["task=cola", "variant=full", "recipe=fairseq_roberta", "train.lr=1e-5", "train.max_steps=10"]]
    # a sweep file narrowed on the command line keeps its entries for the choices it no longer runs
    assert sweep.expand_jobs(grid(task=["rte"], variant=["lora"]), "lora", ["variant.r"],
                             {"task=cola": ["train.max_steps=10"], "variant=full": ["seed=3"]},
                             rank_used=fake_rank_used, declared=grid(task=["rte", "cola"], variant=["lora", "full"])
                             ) == [["task=rte", "variant=lora"]]
    # the default variant (not swept) counts as the job's choice
    assert sweep.expand_jobs(grid(task=["rte"]), "full", ["variant.r"], {"variant=full": ["seed=3"]},
                             rank_used=fake_rank_used) == [["task=rte", "seed=3"]]


def test_the_command_line_wins_over_when():
    """`+sweep=cpu_glue train.epochs=5 recipe=none`: what the user typed is what runs, for every job."""
    points = grid(task=["rte", "cola"], variant=["lora", "full"], **{"train.epochs": ["5"], "recipe": ["none"]})
    when = {"variant=full": ["recipe=fairseq_roberta", "train.lr=1e-5"], "task=cola": ["train.epochs=2"]}
    jobs = sweep.expand_jobs(points, "lora", ["variant.r"], when, rank_used=fake_rank_used,
                             command_line=["+sweep=cpu_glue", "train.epochs=5", "recipe=none"])
    assert jobs == [["task=rte", "variant=lora", "train.epochs=5", "recipe=none"],
                    ["task=rte", "variant=full", "train.epochs=5", "recipe=none", "train.lr=1e-5"],
                    ["task=cola", "variant=lora", "train.epochs=5", "recipe=none"],
                    ["task=cola", "variant=full", "train.epochs=5", "recipe=none", "train.lr=1e-5"]]


@pytest.mark.parametrize("when,message", [({"variant=ful": ["seed=1"]}, "not registered"),
                                          ({"task=wnli": ["seed=1"]}, "neither the sweep's params"),
                                          ({"tsk=rte": ["seed=1"]}, "neither the sweep's params"),
                                          ({"variant": ["seed=1"]}, "key=value")])
def test_when_typos_are_errors(when, message):
    with pytest.raises(ConfigError, match=message):
        sweep.expand_jobs(grid(task=["rte"], variant=["lora"]), "lora", ["variant.r"], when,
                          rank_used=fake_rank_used)


# ---- the sweep files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "conf" / "sweep").glob("*.yaml"))
                         + sorted((REPO / "conf" / "recipe").rglob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_and_recipe_files_are_global_with_a_command_in_the_header(path):
    first, second = path.read_text().splitlines()[:2]
    assert first == "# @package _global_", "Hydra reads @package only on the first line"
    assert second.startswith("# python -m harness"), second


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_is_a_named_multirun_with_its_params_in_the_file(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.sweep_name == name
    assert cfg.hydra.sweeper.params, "sweeper params belong in the sweep file"


def test_glue_variants_runs_vera_once_per_task_and_seed_with_its_papers_recipe():
    when = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sweep" / "glue_variants.yaml").hydra.sweeper.when)
    jobs = sweep.expand_jobs(grid(task=["rte"], variant=["vera", "lora", "full"], **{"variant.r": ["4", "8", "16"]}),
                             "lora", ["variant.r"], when, declared=[["variant=head"]])
    assert jobs == [["task=rte", "variant=vera", "recipe=vera_paper", "variant.r=1024"],
                    ["task=rte", "variant=lora", "variant.r=4"], ["task=rte", "variant=lora", "variant.r=8"],
                    ["task=rte", "variant=lora", "variant.r=16"], ["task=rte", "variant=full", "recipe=fairseq_roberta"]]


QUANTIZATION_KEYS = {"name", "label", "quant", "double_quant", "block_size", "scaler_block_size", "backend", "compute_dtype"}


@pytest.mark.parametrize("name", ["glue_variants", "cpu_glue"])
def test_in_the_comparison_sweeps_qlora_differs_from_lora_only_by_the_quantized_base(name):
    """The qlora column must measure quantization: same targets, r, alpha, dropout and training as LoRA's."""
    sweep_file = OmegaConf.load(REPO / "conf" / "sweep" / f"{name}.yaml")
    when = {condition: extra for condition, extra in OmegaConf.to_container(sweep_file.hydra.sweeper.when).items()
            if not condition.startswith("variant=") or condition in ("variant=lora", "variant=qlora")}
    ranks = str(sweep_file.hydra.sweeper.params["variant.r"]).split(",")
    tasks = str(sweep_file.hydra.sweeper.params.task).split(",")
    jobs = sweep.expand_jobs(grid(task=tasks, variant=["lora", "qlora"], **{"variant.r": ranks}), "lora",
                             ["variant.r"], when)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        configs = {tuple(job): OmegaConf.to_container(compose(config_name="config", overrides=[f"+sweep={name}", *job]),
                                                      resolve=True) for job in jobs}
    pairs = 0
    for job, qlora in configs.items():
        if "variant=qlora" not in job:
            continue
        lora = configs[tuple("variant=lora" if o == "variant=qlora" else o for o in job)]
        assert {k: v for k, v in qlora.items() if k != "variant"} == {k: v for k, v in lora.items() if k != "variant"}
        assert set(qlora["variant"]) - set(lora["variant"]) <= QUANTIZATION_KEYS
        assert {k: v for k, v in qlora["variant"].items() if k not in QUANTIZATION_KEYS} == \
            {k: v for k, v in lora["variant"].items() if k not in ("name", "label")}
        pairs += 1
    assert pairs == len(tasks) * len(ranks)


def test_lora_paper_is_the_table_and_lora_paper_scripts_what_the_scripts_ran():
    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    table, scripts = cfg("recipe=lora_paper", "task=rte"), cfg("recipe=lora_paper_scripts", "task=rte")
    assert (table.train.batch_size, table.train.grad_accum, table.variant.alpha) == (32, 1, 8)
    # roberta_base_rte.sh: num_gpus=8 x --per_device_train_batch_size 32, --lora_alpha 16
    assert (scripts.train.batch_size * scripts.train.grad_accum, scripts.variant.alpha) == (256, 16)
    assert (scripts.train.epochs, scripts.train.lr, scripts.task.max_seq_len) == (80, 5e-4, 512)
    for task in ("mrpc", "rte", "stsb"):  # both warm-start from MNLI, as the scripts' --lora_path does
        assert cfg("recipe=lora_paper", f"task={task}").init_from == "task=mnli"
        assert cfg("recipe=lora_paper_scripts", f"task={task}").init_from == "task=mnli"
    for task in ("mnli", "sst2", "cola", "qnli", "qqp"):
        assert cfg("recipe=lora_paper", f"task={task}").init_from is None


def test_recipe_qlora_paper_gives_the_qlora_papers_adapter_over_the_lora_papers_training():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        paper = compose(config_name="config", overrides=["recipe=qlora_paper", "variant=qlora", "task=mrpc"])
        lora = compose(config_name="config", overrides=["recipe=lora_paper", "variant=qlora", "task=mrpc"])
    variant = paper.variant
    assert (variant.r, variant.alpha, variant.dropout, variant.all_linear) == (64, 16, 0.1, True)
    assert (lora.variant.r, lora.variant.alpha, lora.variant.dropout, lora.variant.all_linear) == (8, 8, 0.0, False)
    assert paper.train == lora.train and paper.task == lora.task


def test_recipes_follow_the_papers():
    def train(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return cfg.train, cfg.task.max_seq_len

    lora_cola, seq = train("recipe=lora_paper", "task=cola")
    assert (lora_cola.batch_size, lora_cola.epochs, lora_cola.lr, lora_cola.warmup_ratio, lora_cola.weight_decay,
            seq) == (32, 80, 4e-4, 0.06, 0.1, 512)
    full_rte, _ = train("recipe=fairseq_roberta", "task=rte", "variant=full")
    assert (full_rte.batch_size, full_rte.epochs, full_rte.lr, list(full_rte.adam_betas)) == (16, 10, 2e-5, [0.9, 0.98])
    assert train("recipe=fairseq_roberta", "task=qqp")[0].warmup_ratio == 0.25  # fairseq's table: 28318/113272
    assert train("recipe=lora_paper", "task=wnli")[0].epochs == 3  # not in the paper: train/default.yaml
    vera_rte, seq = train("recipe=vera_paper", "task=rte", "variant=vera")  # Table 8: head 1e-2, vectors 4e-3
    assert (vera_rte.batch_size, vera_rte.epochs, vera_rte.lr, vera_rte.head_lr, seq) == (64, 160, 4e-3, 1e-2, 512)
    assert train("recipe=lora_paper", "task=rte")[0].head_lr is None


RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))
TASKS = sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("task", TASKS)
def test_every_recipe_composes_with_every_task_into_a_valid_training_config(recipe, task):
    """The per-task file, where the recipe has one, is what the run gets; and the result passes validation."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"recipe={recipe}", f"task={task}"])
    validate_train(cfg.train)
    per_task = REPO / "conf" / "recipe" / recipe / f"{task}.yaml"
    if per_task.exists():
        for key, value in OmegaConf.load(per_task).get("train", {}).items():
            assert cfg.train[key] == value, f"{per_task.name}: train.{key}"


# ---- locks and resources -------------------------------------------------------------------------------
def test_a_run_is_claimed_by_one_process_and_freed_when_its_holder_is_killed(tmp_path):
    cfg = OmegaConf.create({"results_dir": str(tmp_path), "sweep_name": "s"})
    with sweep.claim_run(cfg, "k1"):
        with pytest.raises(RunBusy, match="another process"), sweep.claim_run(cfg, "k1"):
            pass
        with sweep.claim_run(cfg, "k2"):
            pass
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
        "time.sleep(60)"), str(sweep.lock_path(cfg, "k1"))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunBusy):
        with sweep.claim_run(cfg, "k1"):
            pass
    holder.kill()
    holder.wait()
    with sweep.claim_run(cfg, "k1"):  # SIGKILL left no stale claim
        pass


def test_parallel_jobs_get_distinct_gpus(tmp_path):
    first = resources.claim_gpu(["0", "1"], tmp_path, start=0)
    second = resources.claim_gpu(["0", "1"], tmp_path, start=0)
    assert {first[0], second[0]} == {"0", "1"}
    assert resources.claim_gpu(["0", "1"], tmp_path, start=1) is None  # all taken
    first[1].close()
    assert resources.claim_gpu(["0", "1"], tmp_path, start=1)[0] == first[0]


def test_a_local_parallel_job_pins_one_gpu_for_its_process_before_cuda_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(resources, "_pinned_gpu", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resources.pin_gpu(parallel_jobs=1, job_num=1, lock_dir=tmp_path) is None  # sequential: leave it alone
    other = resources.claim_gpu(["0", "1"], tmp_path, start=1)  # another worker already holds GPU 1
    assert resources.pin_gpu(parallel_jobs=2, job_num=1, lock_dir=tmp_path) == "0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert resources.pin_gpu(parallel_jobs=2, job_num=2, lock_dir=tmp_path) == "0", "kept for the process's life"
    resources._pinned_gpu[1].close()
    other[1].close()


def test_threads_per_job_keep_jobs_times_threads_within_the_cores(monkeypatch):
    monkeypatch.delenv("HARNESS_THREADS", raising=False)
    joblib = lambda n: OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",  # noqa: E731
                                         "n_jobs": n})
    assert [resources.torch_threads(joblib(n), 8) for n in (1, 2, 3, 8, -1, -3)] == [8, 4, 2, 1, 1, 1]
    assert resources.local_parallel_jobs(joblib(-3), 8) == 6
    slurm = OmegaConf.create({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                              "cpus_per_task": 10})
    assert resources.torch_threads(slurm, 64) == 10 and resources.local_parallel_jobs(slurm, 64) == 1
    assert resources.torch_threads(OmegaConf.create({"_target_": "BasicLauncher"}), 8) is None
    monkeypatch.setenv("HARNESS_THREADS", "3")
    assert resources.torch_threads(joblib(2), 8) == 3


def test_visible_gpus_come_from_cuda_visible_devices_without_initialising_cuda(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert resources.visible_gpus() == ["2", "3"]


def test_summary_lists_this_sittings_failures(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    base = {"sweep": "s", "task": "rte", "variant": "lora", "seed": 0, "finished_at": before.isoformat()}
    rows.write_row(tmp_path, "s", {**base, "run_key": "a" * 16, "status": "ok", "rank": 8})
    rows.write_row(tmp_path, "s", {**base, "run_key": "b" * 16, "status": "oom", "rank": 4, "error": "CUDA oom"})
    rows.write_row(tmp_path, "s", {**base, "run_key": "c" * 16, "status": "failed", "variant": "full",
                                      "error": "old", "finished_at": "2000-01-01T00:00:00+00:00"})
    text = sweep.format_summary("s", sweep.sitting_rows(tmp_path, "s", before), total_ok=1)
    assert "2 runs finished in this sitting (1 ok, 1 oom)" in text
    assert "oom         bbbbbbbbbbbbbbbb  task=rte variant=lora r=4 seed=0: CUDA oom" in text
    assert "cccc" not in text  # an earlier sitting's failure


# ---- whole sweeps, as a user runs them -----------------------------------------------------------------
def test_smoke_sweep_lists_its_jobs_runs_exactly_those_records_failures_and_resumes(harness_cli):
    """Basic launcher. lora at r=0 is a config error (no row; the sweep goes on, then exits 1 listing it as a job
    that did not start); full runs once for both ranks."""
    grid_args = ["task=rte", "variant=lora,full", "variant.r=0,4"]
    dry = harness_cli(*grid_args, "dry_run=true")
    assert dry.returncode == 0, dry.stderr
    jobs = listing(dry.stdout)
    assert [(s, o) for s, _, o in jobs] == [("todo", "variant=lora variant.r=0"), ("todo", "variant=lora variant.r=4"),
                                            ("todo", "variant=full")]
    assert not harness_cli.results.exists(), "a dry run writes nothing"
    keys = [k for _, k, _ in jobs]

    done = harness_cli(*grid_args)
    assert done.returncode == 1 and "1 of 3 jobs did not end ok" in done.stderr, done.stderr
    found = sweep_rows(harness_cli.results)
    assert sorted(found) == sorted(keys[1:])
    assert [found[k]["status"] for k in keys[1:]] == ["ok", "ok"]
    assert started(harness_cli.results) == Counter(keys)
    assert "1 jobs did not start" in done.stderr + done.stdout
    not_started = [line for line in (done.stderr + done.stdout).splitlines() if "ConfigError: variant.r=0" in line]
    assert not_started and all("variant=lora variant.r=0 " in line for line in not_started)
    lines = done.stdout.splitlines()  # the jobs' log lines, in the order they happened
    said = [i for i, line in enumerate(lines) if "did not start: ConfigError: variant.r=0" in line]
    next_run = [i for i, line in enumerate(lines) if f"run {keys[1]}: " in line]
    assert said and next_run and said[0] < next_run[0], done.stdout  # said when it happened, not only at the end

    again = harness_cli(*grid_args)  # resume: the failed run is retried, the finished ones are skipped
    assert again.returncode == 1 and "1 of 1 jobs did not end ok" in again.stderr, again.stderr
    assert started(harness_cli.results) == Counter({keys[0]: 2, keys[1]: 1, keys[2]: 1})
    assert all(f"skip run {k}" in again.stderr + again.stdout for k in keys[1:])
    assert "the 2 rows kept were measured on: cpu:" in again.stderr + again.stdout
    assert re.search(r"rows kept were measured on: cpu:\S+ threads@\S+, computed in fp32 ", again.stderr + again.stdout)
    assert [s for s, _, _ in listing(harness_cli(*grid_args, "dry_run=true").stdout)] == ["todo", "ok", "ok"]


def test_fail_fast_stops_the_sweep_at_the_first_failure(harness_cli):
    done = harness_cli("task=rte", "variant=lora", "variant.r=0,4", "fail_fast=true")
    assert done.returncode != 0 and "ConfigError" in done.stderr
    assert sweep_rows(harness_cli.results) == {}, "the first job stopped the sweep before the second ran"


# A run's first log line, then (after the token cache's lines) its "training N steps" line: that run is training.
RUN_TRAINING = r"run ([0-9a-f]{16}): .*\n(?:.*token cache.*\n)*.*training \d+ steps"


@pytest.mark.slow  # about a minute: CI runs it in its `-m slow` step
def test_a_sweep_killed_midway_loses_no_row_and_repeats_no_finished_run(harness_cli):
    """SIGKILL in one sitting, SIGTERM (an `interrupted` row) in the next, then the same command to the end."""
    # ~4 s of training per run: long enough that the run seen training is still training when SIGTERM lands
    grid_args = ["task=rte", "variant=lora,full,head", "variant.r=4,8", "train.max_steps=600"]
    results_dir = harness_cli.results

    first = harness_cli(*grid_args, wait=False)
    wait_for(lambda: finished(results_dir), what="a first finished run")
    first.send_signal(signal.SIGKILL)
    first.wait()
    ok_after_first = {k: r["finished_at"] for k, r in sweep_rows(results_dir).items() if r["status"] == "ok"}
    assert ok_after_first

    first_sitting = frozenset(results_dir.glob("*/logs/*/*/__main__.log"))
    second = harness_cli(*grid_args, wait=False)
    in_flight = wait_for(lambda: re.findall(RUN_TRAINING,
                                            job_logs(results_dir, skip=first_sitting)),
                         what="a run of the second sitting training")[-1]  # the newest: still training
    assert in_flight not in ok_after_first
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 143
    assert sweep_rows(results_dir)[in_flight]["status"] == "interrupted"

    third = harness_cli(*grid_args)
    assert third.returncode == 0, third.stderr
    final = sweep_rows(results_dir)
    assert len(final) == 4 and all(r["status"] == "ok" for r in final.values())
    assert all(final[k]["finished_at"] == t for k, t in ok_after_first.items()), "a finished row was rewritten"
    assert finished(results_dir) == Counter(list(final)), "every run finished ok exactly once"


LONG_RUNS = ["task=rte", "variant=lora,full", "variant.r=4", "train.max_steps=5000",  # ~40 s: a signal ends them
             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def runs_training(results_dir: Path) -> set[str]:
    """The keys of the runs training now, once both of LONG_RUNS's are (else an empty set)."""
    keys = set(re.findall(RUN_TRAINING, job_logs(results_dir)))
    return keys if len(keys) == 2 else set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_a_parallel_sweep_alone_still_leaves_interrupted_rows(harness_cli, signum):
    """`kill <sweep pid>` (not the process group): the sweeper passes SIGTERM on to the joblib workers that
    hold a run and waits for their rows before joblib kills them."""
    sweep_process = harness_cli(*LONG_RUNS, wait=False)
    training = wait_for(lambda: runs_training(harness_cli.results), what="both workers' runs training")
    sweep_process.send_signal(signum)
    code = sweep_process.wait(timeout=120)
    log = (harness_cli.results.parent / "cli-0.out").read_text()[-3000:]
    assert code == 130, log
    final = sweep_rows(harness_cli.results)
    assert {key: final[key]["status"] for key in training} == {key: "interrupted" for key in training}, log
    assert all(final[key]["error"] == "Interrupted: received SIGTERM" for key in training)
    assert "2 runs finished in this sitting (2 interrupted)" in log, log  # a stopped sitting still says how it went


def test_a_worker_killed_by_the_os_ends_the_sitting_with_a_clear_error(harness_cli):
    """What the OOM killer does: SIGKILL to one of joblib's workers (joblib then kills the others). The sweep
    says which runs were lost and exits 1, without the launcher's traceback; the same command would rerun them."""
    sweep_process = harness_cli(*LONG_RUNS, wait=False)
    wait_for(lambda: runs_training(harness_cli.results), what="both workers' runs training")
    children = Path(f"/proc/{sweep_process.pid}/task/{sweep_process.pid}/children").read_text().split()
    workers = [pid for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(int(workers[0]), signal.SIGKILL)
    sweep_process.wait(timeout=120)
    log = (harness_cli.results.parent / "cli-0.out").read_text()
    assert sweep_process.returncode == 1, log[-3000:]
    assert "ended without returning (TerminatedWorkerError" in log and "2 of its 2 runs have no ok row" in log
    assert sweep_rows(harness_cli.results) == {}


def test_a_run_lock_names_its_holder_and_only_own_workers_are_signalled(make_cfg):
    cfg = make_cfg()
    lock = sweep.lock_path(cfg, "k1")
    assert sweep.lock_holder(lock) is None
    with sweep.claim_run(cfg, "k1"):
        assert sweep.lock_holder(lock) == f"{socket.gethostname()}:{os.getpid()}"
    assert sweep.lock_holder(lock) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert lifecycle.is_descendant(child.pid) and not lifecycle.is_descendant(os.getppid())
    finally:
        child.kill()


def test_two_sweeps_in_parallel_never_run_or_write_the_same_run(harness_cli):
    """The same sweep twice at once, one of them with joblib's two workers (with DataLoader workers inside)."""
    grid_args = ["task=rte", "variant=lora,full,head", "variant.r=4,8", "train.max_steps=8"]
    procs = [harness_cli(*grid_args, wait=False),
             harness_cli(*grid_args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.num_workers=1",
                         wait=False)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    final = sweep_rows(harness_cli.results)
    assert len(final) == 4 and all(r["status"] == "ok" for r in final.values())
    assert started(harness_cli.results) == Counter(list(final)), "each run trained (and wrote its files) in one process"
    assert len(list(harness_cli.results.glob("smoke/logs/*"))) == 2, "each sweep has its own log folder"


@pytest.mark.slow
def test_smoke_sweep_with_the_joblib_launcher_runs_the_listed_jobs_in_parallel(harness_cli):
    grid_args = ["task=rte,stsb", "variant=lora,full", "variant.r=4"]
    keys = sorted(k for _, k, _ in listing(harness_cli(*grid_args, "dry_run=true").stdout))
    done = harness_cli(*grid_args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.num_workers=1")
    assert done.returncode == 0, done.stderr
    final = sweep_rows(harness_cli.results)
    assert sorted(final) == keys and all(r["status"] == "ok" for r in final.values()), final
    assert started(harness_cli.results) == Counter(keys)


@pytest.mark.slow
def test_smoke_sweep_with_the_submitit_local_launcher(harness_cli):
    grid_args = ["task=rte", "variant=lora,head", "variant.r=4"]
    keys = sorted(k for _, k, _ in listing(harness_cli(*grid_args, "dry_run=true").stdout))
    done = harness_cli(*grid_args, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert done.returncode == 0, done.stderr
    final = sweep_rows(harness_cli.results)
    assert sorted(final) == keys and all(r["status"] == "ok" for r in final.values()), final


@pytest.mark.slow  # about a minute: CI runs it in its `-m slow` step
def test_a_preempted_submitit_job_writes_its_interrupted_row_and_the_sweep_goes_on(harness_cli):
    """SLURM preemption, as submitit_local runs it: SIGTERM to one job's process (found through its run lock).
    That run's row says `interrupted` and its job fails; the other job finishes; the sweep exits 1 at the end."""
    grid_args = ["task=rte", "variant=lora,full", "variant.r=4", "train.max_steps=2500",
                 "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    sweep_process = harness_cli(*grid_args, wait=False)
    locks = harness_cli.results / "smoke" / ".locks"
    holders = wait_for(lambda: len(found := [h for h in map(sweep.lock_holder, locks.glob("*.lock")) if h]) == 2
                       and found, what="both jobs running")
    victim = int(holders[0].rpartition(":")[2])
    wait_for(lambda: runs_training(harness_cli.results), what="both jobs' runs training")
    os.kill(victim, signal.SIGTERM)
    assert sweep_process.wait(timeout=300) == 1
    log, err = ((harness_cli.results.parent / f"cli-0.{kind}").read_text() for kind in ("out", "err"))
    final = sweep_rows(harness_cli.results)
    assert sorted(r["status"] for r in final.values()) == ["interrupted", "ok"], log[-3000:]
    interrupted = next(k for k, r in final.items() if r["status"] == "interrupted")
    assert re.search(rf"interrupted +{interrupted} ", log), "the sweep's summary lists the interrupted run"
    assert "UncompletedJobError" not in err, "the job failed as a job, not as a lost process"


@pytest.mark.slow
def test_hpo_with_optuna_records_failed_trials_and_resumes_by_replay(harness_cli):
    args = ["model=tiny_roberta", "task=rte", "hydra.sweeper.n_trials=4", "device=cpu", "variant.r=choice(0,4)",
            "data.max_train_samples=32", "data.max_eval_samples=16", "train.max_steps=3", "task.max_seq_len=64"]
    done = harness_cli(*args, sweep="hpo")
    assert done.returncode == 0, done.stderr
    first = sweep_rows(harness_cli.results, "hpo")
    assert Counter(r["status"] for r in first.values()) == Counter({"ok": 2}), first  # r=0 trials: no row
    assert "Best value" in done.stderr + done.stdout
    again = harness_cli(*args, sweep="hpo")
    assert again.returncode == 0, again.stderr
    assert sweep_rows(harness_cli.results, "hpo").keys() == first.keys(), "the seeded sampler proposed the same trials"
    ok_trials = {k for k, r in first.items() if r["status"] == "ok"}  # r=0 trials log their start, then stop: no row
    assert all(n == 1 for k, n in started(harness_cli.results).items() if k in ok_trials)


@pytest.mark.slow
@pytest.mark.parametrize("name,expected", [("glue_variants", 1120), ("rank_ablation", 594), ("squad_variants", 72),
                                           ("cpu_glue", 216), ("cpu_glue_v2", 252), ("cpu_glue_v2_rte_cold", 3)])
def test_sweep_sizes(harness_cli, name, expected):
    done = harness_cli("dry_run=true", sweep=name, timeout=1200)
    assert done.returncode == 0, done.stderr
    assert len(listing(done.stdout)) == expected


def test_waiting_for_cluster_jobs_gives_up_on_a_job_whose_state_cannot_be_learned_and_names_it():
    """The sweep's wait for a SLURM array: a running job is waited for as long as it runs; a job that ended without
    a result is lost after a short grace; a job neither a result nor the scheduler accounts for is given up after
    the configured time. (The scheduler here answers through `states`, the clock is simulated.)"""
    now = [0.0]
    finished = set()
    answers = {"7_0": "RUNNING", "7_1": "RUNNING", "7_2": "RUNNING"}

    def states(ids):
        if now[0] >= 100:  # the controller stops answering
            return {}, "squeue: slurm_load_jobs error: Unable to contact slurm controller"
        if now[0] >= 50:
            answers.update({"7_1": "CANCELLED"})  # scancel -s KILL: no result will come
        if now[0] >= 90:
            finished.add("7_0")  # 7_0 writes its result and ends
        return {i: answers[i] for i in ids}, ""

    def sleep(seconds):
        now[0] += seconds

    jobs = [slurm.ClusterJob(i, f"job {i}", lambda i=i: i in finished) for i in ("7_0", "7_1", "7_2")]
    lost = slurm.await_cluster_jobs(jobs, states, unknown_timeout_s=300, ended_grace_s=30, query_every_s=10,
                                    clock=lambda: now[0], sleep=sleep)
    assert set(lost) == {"7_1", "7_2"}
    assert "SLURM job 7_1 ended CANCELLED, and no result came within 30 s" in lost["7_1"]
    assert re.search(r"no result and no state from SLURM for 3\d\d s", lost["7_2"]) and "Unable to contact" in lost["7_2"]
    assert 390 <= now[0] <= 420, "given up unknown_timeout_s after the scheduler's last answer, not sooner or never"
