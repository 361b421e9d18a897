"""`init_from`: a run starts from another run's trained adapter tensors (the LoRA paper's MNLI warm start).

The LoRA paper's roberta-base scripts for MRPC, RTE and STS-B pass `--lora_path ./roberta_base_mnli_lora.bin`
(microsoft/LoRA examples/NLU/roberta_base_{mrpc,rte,stsb}.sh), which run_glue.py loads with
`model.load_state_dict(lora_state_dict, strict=False)` into a model built with the new task's label count. What is
loaded here is the adapter only (every trained tensor outside the task head, plus what the variant saves besides,
e.g. Delta-LoRA's updated weights); the head starts fresh. MNLI's head has 3 outputs, RTE's and MRPC's 2, STS-B's 1, so
the source's output layer cannot be loaded (load_state_dict raises on a shape mismatch even with strict=False), and
the paper (appendix D.1) describes the warm start as initialising the LoRA modules (docs/protocols.md has details).

`init_from` names the source in one of two ways:
  * a run_key (16 hex digits): that run, in this sweep's folder;
  * a task, `mnli` (or `task=mnli`): the run of that task with this run's variant, rank, seed and model. A sweep finds it among its
    own jobs (and runs it first); a single run finds it among the ok rows of its sweep folder.
Either way the selector is replaced by the source's run_key before this run's key is computed, so the run_key
includes the source's key. The source's selected checkpoint is loaded, the one its row's score comes from (eval_best:
its best evaluation, as the paper's best MNLI checkpoint; last: its final state), so the source must have been run
with save_adapter=true.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from harness import rows, run_keys
from harness.adapters.base import is_under
from harness.errors import ConfigError, SourceUnavailable

RUN_KEY = re.compile(r"^[0-9a-f]{16}$")
SELECTOR = re.compile(r"^(?:task=)?([A-Za-z][A-Za-z0-9_]*)$")  # `mnli` on the command line, `task=mnli` in YAML too


def selector_task(value: Any) -> str | None:
    """The task a `task=<name>` selector names; None for null or a run_key; ConfigError for anything else."""
    if value is None or (isinstance(value, str) and RUN_KEY.match(value)):
        return None
    match = SELECTOR.match(value) if isinstance(value, str) else None
    if not match:
        raise ConfigError(f"init_from={value!r} names no run: use null, a run_key (16 hex digits, e.g. from "
                          "dry_run=true), or a task name such as mnli (that task's run with this variant, rank, seed "
                          "and model)")
    return match.group(1)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What a `task=<name>` selector keeps from the run that names it: the same variant, rank, seed and model."""
    return {"variant": cfg.variant.name, "rank": cfg.variant.get("r"), "seed": cfg.seed, "model": cfg.model.name}


def describe_source(task: str, cfg: DictConfig) -> str:
    return f"task={task} " + " ".join(f"{k}={v}" for k, v in identity(cfg).items() if v is not None)


def with_source(cfg: DictConfig, key: str) -> DictConfig:
    """A copy of `cfg` whose init_from is the source's run_key."""
    resolved = cfg.copy()
    OmegaConf.set_struct(resolved, False)
    resolved.init_from = key
    return resolved


def resolve(cfg: DictConfig) -> DictConfig:
    """`cfg` with a `task=<name>` init_from replaced by the source's run_key, found among the ok rows of this sweep's
    folder; null and run_keys pass through unchanged."""
    task = selector_task(cfg.get("init_from"))
    if task is None:
        return cfg
    if task == cfg.task.name:
        raise ConfigError(f"init_from=task={task}: a run cannot start from its own task; name another task")
    wanted = identity(cfg)
    found = rows.read_rows(Path(cfg.results_dir) / cfg.sweep_name)
    keys = [] if found.empty else found[
        (found.status == "ok") & (found.task == task) & (found.variant == wanted["variant"])
        & (found.seed == wanted["seed"]) & (found.model == wanted["model"])
        & (found["rank"].isna() if wanted["rank"] is None else found["rank"] == wanted["rank"])
        & (found["init_from"].isna() if "init_from" in found else True)].run_key.tolist()
    where = rows.runs_dir(cfg.results_dir, cfg.sweep_name)
    if not keys:
        raise ConfigError(f"init_from=task={task}: no ok row of its source ({describe_source(task, cfg)}) in {where}. "
                          f"Run that first with the same sweep_name, run both in one sweep (task={task},"
                          f"{cfg.task.name}: the sweeper runs sources first), or give init_from=<run_key>")
    if len(keys) > 1:
        raise ConfigError(f"init_from=task={task}: {len(keys)} ok rows in {where} match {describe_source(task, cfg)} "
                          f"(runs {', '.join(sorted(keys))}); give the one to start from as init_from=<run_key>")
    return with_source(cfg, keys[0])


def resolve_among_jobs(configs: list[DictConfig]) -> list[DictConfig]:
    """Every job's `task=<name>` init_from replaced by the run_key of the sweep job it names (same variant, rank, seed
    and model, no init_from of its own); a selector no job of the sweep matches is looked up among the rows."""
    sources: dict[tuple, list[DictConfig]] = {}
    for cfg in configs:
        if cfg.get("init_from") is None:
            sources.setdefault((cfg.task.name, *identity(cfg).values()), []).append(cfg)
    resolved = []
    for cfg in configs:
        task = selector_task(cfg.get("init_from"))
        if task is None:
            resolved.append(cfg)
            continue
        matches = sources.get((task, *identity(cfg).values()), [])
        if len(matches) > 1:
            raise ConfigError(f"init_from=task={task}: {len(matches)} jobs of this sweep match "
                              f"{describe_source(task, cfg)}; make the grid name one, or give init_from=<run_key>")
        resolved.append(with_source(cfg, run_keys.run_key(matches[0])) if matches else resolve(cfg))
    return resolved


def source_checkpoint(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """(adapter file, row) of the run `cfg.init_from` names: its selected checkpoint, which must exist and be ok."""
    key = cfg.init_from
    row = rows.read_row(rows.row_path(cfg.results_dir, cfg.sweep_name, key))
    where = rows.runs_dir(cfg.results_dir, cfg.sweep_name)
    if row is None:
        raise SourceUnavailable(f"init_from={key}: the source run has no row in {where}; run it first (a sweep that "
                                "holds both runs it first)")
    if row["status"] != "ok":
        raise SourceUnavailable(f"init_from={key}: the source run (task={row['task']} variant={row['variant']} "
                                f"seed={row['seed']}) ended {row['status']}: {row.get('error')}; fix and rerun it first")
    if rows.made_with_other_weights(row, weights := run_keys.model_fingerprint(cfg)):
        raise SourceUnavailable(f"init_from={key}: the source run (task={row['task']}) trained on other files than "
                                f"{cfg.model.source} holds now (model fingerprint {row['model_fingerprint']}, now "
                                f"{weights}); rerun it first on these weights (a sweep that "
                                "holds both runs does this by itself)")
    if row["variant"] != cfg.variant.name or row.get("rank") != cfg.variant.get("r"):
        raise ConfigError(f"init_from={key}: the source is variant={row['variant']} r={row.get('rank')}, this run is "
                          f"variant={cfg.variant.name} r={cfg.variant.get('r')}; a warm start needs the same adapter")
    path = rows.adapter_file(cfg.results_dir, cfg.sweep_name, key)
    if path is None:
        last = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, key) / "adapter.safetensors"
        raise SourceUnavailable(f"init_from={key}: the source run (task={row['task']}) has no adapter file ({last} is "
                                "missing: run without save_adapter, or its artifacts were not kept, as git does not "
                                "keep them); rerun it first with `rerun=true save_adapter=true` and its own overrides "
                                "(a sweep that holds both runs does this by itself)")
    return path, row


def load_source_adapter(model: nn.Module, head: list[str], path: Path) -> list[str]:
    """Copy the source file's adapter tensors (everything but the task head) into `model`; their names, loaded."""
    state = {name: tensor for name, tensor in load_file(str(path)).items() if not is_under(name, head)}
    if not state:
        raise ConfigError(f"init_from: {path} holds no adapter tensors besides the task head (a head-only run?); "
                          "a warm start needs an adapter: set init_from=null for this variant")
    own = model.state_dict()
    missing = sorted(set(state) - set(own))
    if missing:
        raise ConfigError(f"init_from: {path} has tensors this model lacks ({', '.join(missing[:3])}...): the source "
                          "was built with other targets or another model")
    wrong = [f"{name} {tuple(t.shape)} vs {tuple(own[name].shape)}" for name, t in state.items()
             if t.shape != own[name].shape]
    if wrong:
        raise ConfigError(f"init_from: {path} has tensors of other shapes ({'; '.join(wrong[:3])})")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
    return sorted(state)
