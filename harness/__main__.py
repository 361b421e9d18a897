"""`python -m harness [overrides]`: one run, or a sweep with -m / +sweep=<name>. See README."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.errors import HarnessError
from harness.run import run

log = logging.getLogger("harness")


class RunFailed(HarnessError):
    pass


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    row = run(cfg)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if row["status"] != "ok" and (not multirun or cfg.fail_fast):
        raise RunFailed(f"run {row['run_key']} {row['status']}: {row['error']}")
    score = row.get("score_best")
    return float("nan") if score is None else float(score)


if __name__ == "__main__":
    main()
