"""What every task shares: finding its splits (local Parquet or hub), the held-out protocol, the token cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

from harness.errors import ConfigError, DataError, require
from harness.hub import from_hub
from harness.atomic import publish_folder

log = logging.getLogger(__name__)

PROTOCOLS = ("standard", "holdout")


def group_columns(group_by) -> list[str]:
    """`holdout.group_by` as a list of column names (it may be one name, a list, or unset)."""
    if not group_by:
        return []
    return [group_by] if isinstance(group_by, str) else list(group_by)


def shared_value_groups(frame: pd.DataFrame) -> np.ndarray:
    """A group label per row: rows that share a value (in any of the columns) are one group, transitively.

    Grouping QQP by question1 alone still put a question on both sides whenever it also appeared as another
    row's question2; the connected components of the row-value graph keep every text on one side.
    """
    n_rows = len(frame)
    values, _ = pd.factorize(pd.concat([frame[column] for column in frame.columns], ignore_index=True))
    rows = np.tile(np.arange(n_rows), len(frame.columns))
    rows, values = rows[values >= 0], values[values >= 0]  # a missing value (-1) links nothing
    nodes = n_rows + int(values.max(initial=-1)) + 1
    graph = coo_matrix((np.ones(len(rows)), (rows, values + n_rows)), shape=(nodes, nodes))
    _, labels = connected_components(graph, directed=False)
    return labels[:n_rows]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Truncation/padding state is set by each call (max_length is keyed separately), not part of the tokenizer.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    text += json.dumps(tokenizer.special_tokens_map, sort_keys=True) + type(tokenizer).__name__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(ds: datasets.Dataset) -> str:
    """Hash of the rows themselves (not of paths or times): the cache follows the data, not where it lives."""
    table = ds.with_format("arrow")[:] if len(ds) else ds.data.table.slice(0, 0)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


@contextlib.contextmanager
def tokenizing_alone(folder: Path):
    """Hold an exclusive lock named after `folder` (in a `locks` folder beside the cache's) while filling it: a
    second process asking for the same split waits, then finds it done. Without a POSIX lock (Windows) both
    tokenize and the first to publish wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    locks = folder.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Task:
    """One benchmark task. Subclasses define tokenization, batching, the per-batch outputs and scoring.

    `kind` of the head it needs: classification | regression | qa.
    """

    # Bump when tokenization changes, so no stale cache is reused. It is not part of the run_key (code is not; the
    # row records git_sha): a change that moves scores must also move the keys of the rows it makes stale
    # (run_keys.KEY_VERSION), or a resumed sweep keeps them as done.
    preprocess_version: int = 1

    def __init__(self, cfg, data_cfg):
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.name: str = cfg.name
        self.protocol: str = data_cfg.get("protocol", "standard")
        require(self.protocol in PROTOCOLS, "data.protocol", self.protocol, f"one of {PROTOCOLS}")
        self.validate()

    def validate(self) -> None:
        fraction = self.data_cfg.get("holdout_fraction", 0.2)
        require(0 < fraction < 1, "data.holdout_fraction", fraction, "a fraction strictly between 0 and 1")
        for key in ("max_train_samples", "max_eval_samples"):
            value = self.data_cfg.get(key)
            require(value is None or (isinstance(value, int) and value > 0), f"data.{key}", value,
                    "null or a positive integer")
        require(int(self.cfg.max_seq_len) > 8, "task.max_seq_len", self.cfg.max_seq_len, "an integer > 8")

    # ---- properties every task has ------------------------------------------------------------------
    @property
    def head_kind(self) -> str:
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        return int(self.cfg.get("num_labels", 0) or 0)

    @property
    def primary_metric(self) -> str:
        return self.cfg.primary_metric

    @property
    def eval_splits(self) -> list[str]:
        return list(self.cfg.eval_splits)

    def protocol_description(self) -> str:
        if self.protocol == "standard":
            return f"standard: train on {self.cfg.train_split}, evaluate on {', '.join(self.eval_splits)}"
        group = group_columns(self.cfg.holdout.get("group_by"))
        return (
            f"holdout: train and evaluation sets both drawn from {self.cfg.holdout.source_split}; "
            f"{self.data_cfg.holdout_fraction:g} held out for evaluation"
            + (f" grouped by {'+'.join(group)}" if group else "")
            + f", seed {self.data_cfg.holdout_seed}; NOT the standard split"
        )

    # ---- raw data -----------------------------------------------------------------------------------
    def local_path(self, split: str) -> Path | None:
        root = self.data_cfg.get("dir")
        if not root:
            return None
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.dir={str(root)!r} does not exist; point it at a folder with "
                            f"glue/<task>/<split>.parquet (and squad/<split>.parquet), or unset it to use the hub")
        return root / self.cfg.local_subdir / f"{split}.parquet"

    def load_split(self, split: str) -> datasets.Dataset:
        path = self.local_path(split)
        if path is not None:
            if not path.exists():
                available = sorted(p.stem for p in path.parent.glob("*.parquet"))
                hint = self.missing_split_hint(split, available)
                raise DataError(f"task {self.name}: no split {split!r}; looked for {path}. "
                                f"Available there: {available or 'none'}. {hint}")
            table = pq.read_table(path)
            if table.num_rows == 0:
                raise DataError(f"task {self.name}: split {split!r} is empty (0 rows in {path}); "
                                "replace the file with the split's rows")
            return datasets.Dataset(table)
        hub_id, hub_config = self.cfg.hub_id, self.cfg.get("hub_config")
        what = f"{hub_id}" + (f" ({hub_config})" if hub_config else "") + f" split {split!r}"
        try:
            loaded = from_hub(lambda: datasets.load_dataset(hub_id, hub_config, split=split), what)
        except ValueError as err:  # datasets: 'Unknown split'
            raise DataError(f"task {self.name}: {err}. {self.missing_split_hint(split, [])}") from err
        if len(loaded) == 0:
            raise DataError(f"task {self.name}: {what} is empty (0 rows)")
        return loaded

    def split_source(self, split: str) -> str:
        """Where a split's rows come from, for messages: the local file, or the hub id."""
        path = self.local_path(split)
        hub_config = self.cfg.get("hub_config")
        return str(path) if path is not None else f"{self.cfg.hub_id}" + (f" ({hub_config})" if hub_config else "")

    def missing_split_hint(self, split: str, available: list[str]) -> str:
        if split == self.cfg.get("train_split") and self.cfg.get("holdout"):
            return (f"Without a train split, data.protocol=holdout trains on part of "
                    f"{self.cfg.holdout.source_split} and evaluates on the rest (recorded in the row).")
        return f"task.eval_splits for {self.name} are {self.eval_splits}."

    def train_and_eval_raw(self) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
        """The raw training set and evaluation sets under the configured protocol."""
        if self.protocol == "standard":
            train = self.load_split(self.cfg.train_split)
            evals = {split: self.load_split(split) for split in self.eval_splits}
            return train, evals
        holdout = self.cfg.get("holdout")
        if not holdout:
            raise ConfigError(f"data.protocol=holdout: task {self.name} defines no holdout source split")
        source_name = holdout.source_split
        source = self.load_split(source_name)
        train_idx, eval_idx = self.holdout_indices(source, holdout.get("group_by"))
        evals = {split: self.load_split(split) for split in self.eval_splits if split != source_name}
        return source.select(train_idx), {source_name: source.select(eval_idx), **evals}

    def holdout_indices(self, source: datasets.Dataset, group_by) -> tuple[np.ndarray, np.ndarray]:
        """Split rows with scikit-learn, keeping every group (an article; rows sharing a text) on one side.

        `group_by` is a column or a list of them; `data.holdout_fraction` is the fraction of groups held out.
        """
        fraction, seed = self.data_cfg.holdout_fraction, self.data_cfg.holdout_seed
        rows = np.arange(len(source))
        columns = group_columns(group_by)
        if columns:
            missing = [c for c in columns if c not in source.column_names]
            require(not missing, "task.holdout.group_by", group_by,
                    f"columns of {self.name}'s {self.cfg.holdout.source_split} ({source.column_names})")
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            groups = shared_value_groups(source.select_columns(columns).to_pandas())
            train_idx, eval_idx = next(splitter.split(rows, groups=groups))
        else:
            splitter = ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            train_idx, eval_idx = next(splitter.split(rows))
        return np.sort(train_idx), np.sort(eval_idx)

    def selection_split(self, train: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
        """train.selection=heldout: (the rows that train, the rows that pick the checkpoint). A fixed share
        (data.selection_fraction) of the training set, grouped as the holdout protocol groups (rows that share a
        text are on one side), the same for every seed and variant (data.holdout_seed)."""
        fraction = self.data_cfg.get("selection_fraction", 0.1)
        require(isinstance(fraction, float) and 0 < fraction < 1, "data.selection_fraction", fraction,
                "a fraction strictly between 0 and 1 (the share of the training data that selects the checkpoint)")
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=self.data_cfg.get("holdout_seed", 0))
        fit, select = next(splitter.split(np.arange(len(train)), groups=self.text_groups(train)))
        return train.select(np.sort(fit)), train.select(np.sort(select))

    def text_groups(self, train: datasets.Dataset) -> np.ndarray:
        """A group label per training row (rows sharing a text share a label), for `selection_split`."""
        raise ConfigError(f"train.selection=heldout is not implemented for task {self.name} (kind "
                          f"{type(self).__name__}); use train.selection=eval_best or last")

    # ---- tokenized, cached --------------------------------------------------------------------------
    def cache_key(self, tokenizer, split_name: str, raw: datasets.Dataset) -> str:
        spec = {
            "task": OmegaConf.to_container(self.cfg, resolve=True),
            "split": split_name,
            "rows": content_hash(raw),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "version": self.preprocess_version,
            "kind": type(self).__name__,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def cached(self, tokenizer, split_name: str, raw: datasets.Dataset,
               encode: Callable[[datasets.Dataset], datasets.Dataset]) -> datasets.Dataset:
        """`encode(raw)`, stored once under a key of (task, split content, tokenizer, max length, version)."""
        cache_root = Path(self.data_cfg.get("cache_dir") or ".cache/harness") / "tokenized"
        folder = cache_root / f"{self.name}-{split_name}-{self.cache_key(tokenizer, split_name, raw)}"
        if (folder / "dataset_info.json").exists():
            log.info("token cache hit: %s", folder.name)
            return datasets.load_from_disk(str(folder))
        with tokenizing_alone(folder):  # parallel jobs (joblib workers) of a sweep tokenize a split once, not each
            if not (folder / "dataset_info.json").exists():
                log.info("token cache miss: tokenizing %s %s into %s", self.name, split_name, folder.name)
                encoded = encode(raw)
                publish_folder(folder, lambda tmp: encoded.save_to_disk(str(tmp)))
            else:
                log.info("token cache hit (after waiting for another job): %s", folder.name)
        return datasets.load_from_disk(str(folder))

    def limit(self, ds: datasets.Dataset, key: str) -> datasets.Dataset:
        """The first n rows of a fixed shuffle (data.subset_seed, not the run's seed): every seed and every
        variant sees the same subset, so their scores are paired and comparable."""
        n = self.data_cfg.get(key)
        if n is None or n >= len(ds):
            return ds
        return ds.shuffle(seed=self.data_cfg.get("subset_seed", 0)).select(range(n))

    # ---- what subclasses provide --------------------------------------------------------------------
    def datasets(self, tokenizer, seed: int) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
        """Tokenized (train, {eval split: eval set})."""
        raise NotImplementedError

    def collate(self, tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def model_inputs(self, batch: dict[str, torch.Tensor], training: bool) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward (labels included when training)."""
        raise NotImplementedError

    def batch_outputs(self, batch: dict[str, torch.Tensor], outputs: Any) -> dict[str, np.ndarray]:
        """Per-example arrays kept from one evaluation batch."""
        raise NotImplementedError

    def score(self, split: str, dataset: datasets.Dataset, outputs: dict[str, np.ndarray]
              ) -> tuple[dict[str, float], pd.DataFrame]:
        """Metrics (names from harness.rows.METRIC_NAMES) and per-example predictions for one split."""
        raise NotImplementedError

    def metric_suffix(self, split: str) -> str:
        """Metrics of the first eval split are unsuffixed; others get the task's tag (MNLI mismatched: _mm)."""
        if split == self.eval_splits[0]:
            return ""
        return "_" + dict(self.cfg.get("split_tags") or {}).get(split, split)
