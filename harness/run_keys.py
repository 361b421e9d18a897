"""What identifies a run: its run_key.

run_key = hash of {key_version, the semantic config, the data fingerprint}. The semantic config is the resolved
config minus what says where or how a run executes (paths, workers, logging, trackers, display labels); the data
fingerprint hashes the rows of the local split files the run reads. Runs with the same run_key compute the same
numbers, so the key names the run's row (<results_dir>/<sweep>/runs/<run_key>.parquet, harness/rows.py): a sweep
skips a run whose key already has an ok row, the same run on another device or under another results_dir keeps
its key, and other data or another setting that changes the numbers is another run. Committed rows keep their
keys across code changes: the rules for adding and retiring config keys are below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError

log = logging.getLogger(__name__)

# run_key = hash of {key_version, the semantic config, the data fingerprint}. The semantic config is the resolved
# config minus NOT_IN_KEY, and minus every ADDED_KEYS key whose value is the one that keeps the old behaviour.
# To add a config key: if it says where or how a run executes (paths, workers, logging, trackers), add its dotted
# path to NOT_IN_KEY; if it changes what a run computes, add `"group.key": <its default>` to ADDED_KEYS. Either
# way, every committed row keeps its run_key. Changing anything else here moves keys: bump KEY_VERSION and migrate
# the committed rows (python -m harness.migrate_keys results).
KEY_VERSION = 2
NOT_IN_KEY = {"results_dir", "sweep_name", "fail_fast", "save_adapter", "device", "hydra", "dry_run", "rerun", "logger",
              "data.dir", "data.cache_dir", "train.num_workers", "train.log_every_steps", "train.eval_batch_size",
              "variant.label", "task.label"}  # labels: display names for tables (renaming one changes no number)
ADDED_KEYS = {"train.head_lr": None, "train.group_by_length": False, "train.selection": "eval_best",
              "data.selection_fraction": 0.1, "init_from": None,  # warm start (issue 14)
              "variant.frozen": False}  # DyLoRA: frozen=false (the old mode) keeps old keys; true, new ones


# Keys that older configs had and today's do not, each with the key that now holds its value (it always held the
# same). A config without the retired key gets it back, with that value, before hashing: committed rows and today's
# runs of the same config share their run_key, with no migration. `adapter.impl` was a second name for the
# implementation switch (the variant YAMLs read `impl: ${adapter.impl}`); `variant.impl` is the one name now.
RETIRED_KEYS = {"adapter.impl": "variant.impl"}


def semantic_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config minus paths, devices and bookkeeping: what determines the numbers (the data aside)."""
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    for retired, current in RETIRED_KEYS.items():
        restore_retired_key(full, retired, current)

    def keep(path: str, value: Any) -> bool:
        return path not in NOT_IN_KEY and not (path in ADDED_KEYS and value == ADDED_KEYS[path])

    def prune(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {k: prune(v, f"{prefix}{k}.") if isinstance(v, dict) else v
                for k, v in node.items() if keep(prefix + k, v)}

    return prune(full, "")


def restore_retired_key(config: dict[str, Any], retired: str, current: str) -> None:
    """Put `retired` (a dotted path) back into `config` with the value at `current`, unless it is there already
    (an older config) or `current` is missing."""
    node: Any = config
    for part in current.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    *parents, leaf = retired.split(".")
    target = config
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            return
    target.setdefault(leaf, node)


def data_fingerprint(cfg: DictConfig | dict[str, Any]) -> str | None:
    """A hash of the rows of every local split file the run reads (each split's `content_hash`, the token cache's
    key), so that other data means another run_key; None when the data comes from the hub (a published dataset
    is named by its hub id, which is in the task config). A missing file counts as missing: the run then fails
    naming it."""
    files = split_files(cfg)
    if files is None:
        return None
    hashes = {split: split_fingerprint(path) for split, path in files.items()}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def split_files(cfg: DictConfig | dict[str, Any]) -> dict[str, Path] | None:
    """{split: local Parquet file} of the splits a run reads under its protocol; None for hub data."""
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    task, data = full.get("task") or {}, full.get("data") or {}
    if not data.get("dir") or not task.get("local_subdir"):
        return None
    splits = list(task.get("eval_splits") or [])
    if data.get("protocol", "standard") == "holdout" and task.get("holdout"):
        splits.insert(0, task["holdout"]["source_split"])
    elif task.get("train_split"):
        splits.insert(0, task["train_split"])
    folder = Path(data["dir"]).expanduser() / task["local_subdir"]
    return {split: folder / f"{split}.parquet" for split in dict.fromkeys(splits)}


_split_hashes: dict[tuple[str, int, int], str] = {}


def file_identity(path: Path) -> tuple[str, int, int]:
    """(path, size, mtime): what a remembered hash of the file is kept under; a rewrite gives another."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def split_fingerprint(path: Path) -> str:
    """`content_hash` of one split file's rows ("missing" without the file), remembered per (path, size, mtime)."""
    try:
        memo = file_identity(path)
    except OSError:
        return "missing"
    if memo not in _split_hashes:
        import datasets  # slow to import; only runs on local data need it

        from harness.tasks.base import content_hash

        _split_hashes[memo] = content_hash(datasets.Dataset(pq.read_table(path)))
    return _split_hashes[memo]


def model_fingerprint(cfg: DictConfig) -> str | None:
    """A hash of the files a pretrained model and its tokenizer load from a local folder (`MODEL_FILES`: weights,
    config, tokenizer), or None for a random init, a hub id (named by the id in the config) and a folder this
    machine does not have.

    Not part of the run_key, which names the folder and not its contents, so that committed rows keep their keys:
    the row records it, a run or sweep does not keep an ok row whose recorded fingerprint differs from the
    folder's (`rows.made_with_other_weights`), a warm start refuses such a source, and the report refuses a cell
    whose seeds loaded different files. Each file's hash is remembered under data.cache_dir per (path, size,
    mtime), so a run hashes the weights once per machine, not once per run."""
    model = cfg.model
    if model.get("init", "pretrained") != "pretrained" or not model.get("source"):
        return None
    from harness.models import resolve_source  # imports transformers; the report never asks for this

    try:
        folder = Path(resolve_source(model.source)).expanduser()
    except ConfigError:  # `package:` without the package: the run's own loading says so, with the fix
        return None
    if not folder.is_dir():
        return None
    memo = Path(cfg.data.get("cache_dir") or ".cache/harness") / "file_hashes"
    files = sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, m) for m in MODEL_FILES))
    hashes = {p.name: file_hash(p, memo) for p in files}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


# What transformers' from_pretrained and the tokenizers read from a model folder; not a Trainer's checkpoint
# state (optimizer.pt, trainer_state.json, training_args.bin) or notes beside them.
MODEL_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "*.model")

_file_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's bytes, remembered in this process and in `memo_dir` per (path, size, mtime). The memo is
    a speed-up only: an unreadable or malformed entry is hashed again, and one that cannot be written is not."""
    identity = file_identity(path)
    if identity in _file_hashes:
        return _file_hashes[identity]
    remembered = memo_dir / hashlib.sha256(repr(identity).encode()).hexdigest()[:24]
    try:
        digest = remembered.read_text().strip()
    except OSError:
        digest = ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        digest = sha256_of_file(path)
        scratch = None
        try:
            memo_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=memo_dir, prefix=f".{remembered.name}.", delete=False) as tmp:
                scratch = tmp.name
                tmp.write(digest)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(scratch, remembered)  # whole or absent, as everything the cache holds
        except OSError as err:
            if scratch:
                Path(scratch).unlink(missing_ok=True)
            log.debug("could not remember the hash of %s in %s: %s", path, memo_dir, err)
    _file_hashes[identity] = digest
    return digest


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def run_key(cfg: DictConfig | dict[str, Any], fingerprint: str | None = None) -> str:
    """The run's identity: its semantic config and its data (`fingerprint`: data_fingerprint(cfg), computed when
    not given)."""
    fingerprint = fingerprint if fingerprint is not None else data_fingerprint(cfg)
    identity = {"key_version": KEY_VERSION, "config": semantic_config(cfg), "data": fingerprint}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
