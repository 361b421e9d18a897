"""Shared fixtures: offline always, a tiny random RoBERTa, tiny GLUE-format data, configs composed with Hydra."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = ("the movie was good bad great dull a cat dog sat on mat film plot cast wonderful lifeless "
         "company profit rose said plan budget small capital france paris city").split()


def sentence(rng: np.random.Generator, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_glue_split(folder: Path, split: str, columns: list[str], n: int, labels, seed: int) -> None:
    """A small split in the hub schema: text columns, `label`, `idx` (int32)."""
    rng = np.random.default_rng(seed)
    data = {c: [sentence(rng, int(rng.integers(4, 12))) for _ in range(n)] for c in columns}
    data["label"] = labels(rng, n)
    data["idx"] = np.arange(n, dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(data).to_parquet(folder / f"{split}.parquet", index=False)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """glue/{rte,sst2,cola,stsb,mrpc}/{train,validation} and glue/mnli validation_* (no train, like here)."""
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
