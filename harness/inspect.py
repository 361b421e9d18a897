"""`python -m harness.inspect <overrides>`: build the model and its adapters without training and print
what is targeted and what is trainable. The last line is the same as one JSON object.

    python -m harness.inspect model=roberta_base model.init=random variant=lora task=rte
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from harness.assemble import assemble, parameter_counts

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def inspect(cfg: DictConfig) -> dict:
    """The modules `cfg`'s variant adapts, the task head, and the parameter counts of the model a run would train."""
    setup = assemble(cfg, with_tokenizer=False)
    return {"targeted_modules": setup.targeted, "head_modules": setup.head, **parameter_counts(setup.model, setup.head)}


def main(argv: list[str]) -> None:
    report = inspect(compose_config(argv))
    print(f"targeted modules ({len(report['targeted_modules'])}):")
    for name in report["targeted_modules"]:
        print(f"  {name}")
    print(f"task head: {', '.join(report['head_modules'])} ({report['head_params']:,} parameters)")
    print(f"trainable parameters:            {report['trainable_params']:>15,}")
    print(f"trainable parameters (no head):  {report['trainable_params_no_head']:>15,}")
    print(f"total parameters:                {report['total_params']:>15,}")
    keys = ("targeted_modules", "trainable_params", "trainable_params_no_head", "total_params")
    print(json.dumps({k: report[k] for k in keys}))


if __name__ == "__main__":
    main(sys.argv[1:])
