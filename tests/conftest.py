"""Shared fixtures: offline always, a tiny random RoBERTa, tiny GLUE-format data, configs composed with Hydra."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
SHARED_DATA = REPO.parent / "shared" / "data"
# SQuAD windows short enough that the fixture's contexts span several (with the squad_data_dir fixture)
SQUAD_SHORT_WINDOWS = ["task.max_seq_len=48", "task.doc_stride=16", "task.max_question_len=12"]

WORDS = ("the movie was good bad great dull a cat dog sat on mat film plot cast wonderful lifeless "
         "company profit rose said plan budget small capital france paris city").split()


def wait_for(condition, timeout: float = 300, what: str = "condition", poll_s: float = 0.2):
    """Poll `condition()` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def merged_and_composed(layer, x):
    """The layer's outputs and the gradients of (x, A, B) through its merged-weight path, then its composed one."""
    outputs, grads = [], []
    for min_tokens in (0, 2**62):  # merged, then composed
        layer.merged_path_min_tokens = min_tokens
        y = layer(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)])
        for t in (x, layer.lora_A, layer.lora_B):
            t.grad = None
    return outputs, grads


def sentence(rng: np.random.Generator, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_glue_split(folder: Path, split: str, columns: list[str], n: int, labels, seed: int,
                     reuse: bool = False) -> None:
    """A small split in the hub schema: text columns, `label`, `idx` (int32).

    `reuse`: half the rows take their second text from another row's first, as QQP's questions recur.
    """
    rng = np.random.default_rng(seed)
    data = {c: [sentence(rng, int(rng.integers(4, 12))) for _ in range(n)] for c in columns}
    if reuse:
        first, second = columns
        for i in range(0, n, 2):
            data[second][i] = data[first][(7 * i + 3) % n]
    data["label"] = labels(rng, n)
    data["idx"] = np.arange(n, dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(data).to_parquet(folder / f"{split}.parquet", index=False)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """glue/{rte,sst2,cola,stsb,mrpc}/{train,validation}; glue/mnli validation_* and glue/{qqp,qnli}/validation
    (no train, like here)."""
    root = tmp_path_factory.mktemp("data")
    binary = lambda rng, n: rng.integers(0, 2, size=n).astype(np.int64)  # noqa: E731
    three = lambda rng, n: rng.integers(0, 3, size=n).astype(np.int64)  # noqa: E731
    score = lambda rng, n: rng.uniform(0, 5, size=n).astype(np.float32)  # noqa: E731
    pairs = ["sentence1", "sentence2"]
    for task, columns, labels in [("rte", pairs, binary), ("mrpc", pairs, binary), ("stsb", pairs, score),
                                  ("sst2", ["sentence"], binary), ("cola", ["sentence"], binary)]:
        write_glue_split(root / "glue" / task, "train", columns, 96, labels, seed=1)
        write_glue_split(root / "glue" / task, "validation", columns, 40, labels, seed=2)
    for split in ("validation_matched", "validation_mismatched"):
        write_glue_split(root / "glue" / "mnli", split, ["premise", "hypothesis"], 60, three, seed=3)
    write_glue_split(root / "glue" / "qqp", "validation", ["question1", "question2"], 60, binary, seed=4, reuse=True)
    write_glue_split(root / "glue" / "qnli", "validation", ["question", "sentence"], 60, binary, seed=5, reuse=True)
    return root


@pytest.fixture
def make_cfg(tmp_path, tiny_data_dir):
    """compose(overrides) -> a full config on the tiny model and tiny data, writing under tmp_path."""

    def make(*overrides: str, data_dir: Path | None = None):
        base = [
            "model=tiny_roberta", "task=rte", f"data.dir={data_dir or tiny_data_dir}",
            f"results_dir={tmp_path / 'results'}", f"data.cache_dir={tmp_path.parent / 'harness-cache'}",
            "train.max_steps=4", "train.batch_size=8", "train.eval_batch_size=16", "device=cpu",
        ]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=base + list(overrides))

    return make


# ---- LoRA against peft (tests/test_variants.py, tests/test_train.py) --------------------------------------
def peft_twin(cfg, ours):
    """peft's LoRA (r=4, alpha=8 on query,value; classifier trained) on a copy of `ours`: same base, A, B, head."""
    from peft import LoraConfig, get_peft_model

    from harness import adapters, models

    plain = models.load(cfg.model, "classification", 2, cfg.data.cache_dir).model
    # Same base weights: copy ours' base (the wrapped .base.weight) into peft's model.
    plain.load_state_dict({k.replace(".base.", "."): v for k, v in ours.model.state_dict().items() if "lora_" not in k})
    theirs = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                              lora_dropout=0.0, modules_to_save=["classifier"]))
    for name, layer in adapters.adapter_layers(ours.model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A.data)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B.data)
    theirs.base_model.model.classifier.modules_to_save["default"].load_state_dict(ours.model.classifier.state_dict())
    return theirs


# ---- SQuAD-format data ------------------------------------------------------------------------------------


def squad_rows(rng: np.random.Generator, n_articles: int, questions_per_context: int, unanswerable: float,
               prefix: str) -> list[dict]:
    """Articles of two long contexts each; answers are whole-word spans, some questions have 2 gold answers.

    Contexts are 50-90 words so that short windows (task.max_seq_len=48) split them into several.
    """
    rows = []
    for a in range(n_articles):
        title = f"{prefix}_article_{a}"
        for c in range(2):
            words = list(rng.choice(WORDS, size=int(rng.integers(50, 90))))
            context = " ".join(words)
            starts = np.cumsum([0] + [len(w) + 1 for w in words])
            for q in range(questions_per_context):
                qid = f"{prefix}{a:02d}{c}{q}"
                question = "what " + sentence(rng, int(rng.integers(3, 7))) + " ?"
                if rng.random() < unanswerable:
                    answers = {"text": [], "answer_start": []}
                else:
                    i = int(rng.integers(0, len(words) - 3))
                    while words[i] in ("the", "a"):  # an answer that normalises to "" scores F1 0 officially
                        i += 1
                    k = int(rng.integers(1, 4))
                    gold = [" ".join(words[i:i + k])]
                    answer_start = [int(starts[i])]
                    if rng.random() < 0.3:  # a second annotator's shorter answer
                        gold.append(words[i])
                        answer_start.append(int(starts[i]))
                    answers = {"text": gold, "answer_start": answer_start}
                rows.append({"id": qid, "title": title, "context": context, "question": question, "answers": answers})
    return rows


def write_squad_split(folder: Path, split: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("context", pa.string()),
                        ("question", pa.string()),
                        ("answers", pa.struct([("text", pa.list_(pa.string())),
                                               ("answer_start", pa.list_(pa.int32()))]))])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"{split}.parquet")


@pytest.fixture(scope="session")
def squad_data_dir(tmp_path_factory) -> Path:
    """squad/{train,validation} (all answerable) and squad_v2/{train,validation} (about 1/3 unanswerable)."""
    root = tmp_path_factory.mktemp("squad_data")
    rng = np.random.default_rng(7)
    for name, unanswerable in (("squad", 0.0), ("squad_v2", 0.35)):
        write_squad_split(root / name, "train", squad_rows(rng, 6, 4, unanswerable, "tr"))
        write_squad_split(root / name, "validation", squad_rows(rng, 5, 3, unanswerable, "va"))
    return root


# ---- sweeps (tests/test_sweeps.py) ---------------------------------------------------------------------
@pytest.fixture
def harness_cli(tmp_path, tiny_data_dir):
    """cli(*overrides, sweep="smoke", wait=True): `python -m harness +sweep=<sweep> <overrides>` in a subprocess,
    on the tiny data, writing under tmp_path/results. Returns the CompletedProcess, or the Popen when wait=False
    (output to tmp_path/cli-<n>.out/.err, so a long sweep never blocks on a full pipe). Offline, one torch thread."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HARNESS_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = [f"data.dir={tiny_data_dir}", f"results_dir={tmp_path / 'results'}",
            f"data.cache_dir={tmp_path.parent / 'harness-cache'}"]
    count = iter(range(1000))

    def cli(*overrides: str, sweep: str = "smoke", wait: bool = True, timeout: float = 600):
        cmd = [sys.executable, "-m", "harness", f"+sweep={sweep}", *base, *overrides]
        if wait:
            return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        n = next(count)
        out, err = open(tmp_path / f"cli-{n}.out", "w"), open(tmp_path / f"cli-{n}.err", "w")  # noqa: SIM115
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)

    cli.results = tmp_path / "results"
    return cli


# ---- report rows (tests/test_report_*.py) ---------------------------------------------------------------
REPORT_VARIANTS = [("variant=lora", "variant.r=4"), ("variant=lora", "variant.r=8"), ("variant=full",),
                   ("variant=head",)]
REPORT_TASKS = ("rte", "stsb")
REPORT_SEEDS = (0, 1)
REPORT_BAD = ("task=rte", "variant=lora", "train.lr=1e12", "train.max_grad_norm=null",  # diverges: a `diverged`
              "train.schedule=constant", "train.warmup_ratio=0")                        # row, not a config error


@pytest.fixture(scope="session")
def report_rows_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-results")


@pytest.fixture
def report_rows_dir(make_cfg, report_rows_root) -> Path:
    """<root>/report_test: real rows of harness.run.run on the tiny model (2 tasks x LoRA r=4/8, full, head x 2
    seeds, 2 steps each) and 1 failed row; built once per session for every report test file."""
    import torch

    from harness.run import run

    sweep = report_rows_root / "report_test"
    if not (sweep / ".complete").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread avoids contention with parallel jobs
        try:
            for task in REPORT_TASKS:
                for variant in REPORT_VARIANTS:
                    for seed in REPORT_SEEDS:
                        cfg = make_cfg(f"task={task}", *variant, f"seed={seed}", "train.max_steps=2",
                                       "sweep_name=report_test", f"results_dir={report_rows_root}")
                        assert run(cfg)["status"] == "ok"
            bad = run(make_cfg(*REPORT_BAD, "sweep_name=report_test", f"results_dir={report_rows_root}"))
            assert bad["status"] == "diverged"
        finally:
            torch.set_num_threads(threads)
        (sweep / ".complete").touch()
    return sweep


@pytest.fixture
def report_written(report_rows_dir, tmp_path) -> Path:
    """The text outputs of a fresh report of report_rows_dir (no plots), in tmp_path/report."""
    from harness import report

    return report.write_report([report_rows_dir], tmp_path / "report", plots=False, resamples=200)
