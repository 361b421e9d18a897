"""Quiet startup: keep known, harmless third-party noise out of every command's output, and nothing else.

- transformers imports torchao whenever it is installed (for its own torchao quantizer, which the harness
  never uses): import time on every command, two "Failed to load ...torchao/_C_*.so" lines and two torch
  "_pytree ... deprecated" warnings. The harness imports torchao itself, and only for `variant=qlora`.
- When torchao is imported (`variant=qlora`), those two kinds of lines go to debug level instead.
- While the harness loads a pretrained encoder, transformers' table of the checkpoint keys it did not use
  or did not find (its "LOAD REPORT", with raw terminal colour codes when piped) and its "Loading weights"
  progress bar are held back: a freshly initialised task head is what fine-tuning expects, and
  `harness.models` says in its own words if anything else was missing. If the load fails, the report is let
  through, since it explains the failure.

Importing this module applies the process-wide part (`startup()`): import it before transformers' model
code (`transformers.modeling_utils`) is first imported, as harness/models.py and harness/train.py do.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOAD_REPORT_MARKERS = (
    "LOAD REPORT",  # transformers >= 5
    "were not initialized from the model checkpoint",  # transformers 4
    "were not used when initializing",  # transformers 4
)


class DemoteToDebug(logging.Filter):
    """Turns one logger's records that match `matches` into debug records: shown only where debug is shown."""

    def __init__(self, matches: Callable[[str], bool]):
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not self.matches(record.getMessage()):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


KNOWN_NOISE = {
    # torchao's CUDA kernel libraries that cannot load on this machine; the NF4/int8 tensors QLoRA uses need none
    "torchao": lambda message: message.startswith("Failed to load") and "torchao" in message,
    # torchao registers its enums with torch.compile the old way
    "torch.utils._pytree": lambda message: "register_constant() on Enum subclasses is deprecated" in message,
}


def startup() -> None:
    """Everything process-wide (repeated calls change nothing)."""
    keep_torchao_out_of_transformers()
    for logger_name, matches in KNOWN_NOISE.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DemoteToDebug) for f in logger.filters):
            logger.addFilter(DemoteToDebug(matches))


def keep_torchao_out_of_transformers() -> None:
    """Tell transformers that torchao is not installed, so that importing its model code does not import
    torchao. Only its torchao quantizer (`from_pretrained(quantization_config=TorchAoConfig(...))`) asks,
    and the harness quantizes with torchao directly (harness/adapters/qlora.py). A no-op once transformers'
    model code or torchao is imported: then there is nothing left to save."""
    if "transformers.modeling_utils" in sys.modules or "torchao" in sys.modules:
        return
    import transformers.utils
    from transformers.utils import import_utils

    def is_torchao_available(*args, **kwargs) -> bool:
        return False

    transformers.utils.is_torchao_available = import_utils.is_torchao_available = is_torchao_available


@contextmanager
def loading_pretrained() -> Iterator[None]:
    """Around `from_pretrained`: hold back transformers' load report and its own progress bars; let the report
    through if loading fails."""
    from transformers.utils import logging as transformers_logging

    held: list[logging.LogRecord] = []
    logger = logging.getLogger("transformers.modeling_utils")

    def hold_report(record: logging.LogRecord) -> bool:
        if any(marker in record.getMessage() for marker in LOAD_REPORT_MARKERS):
            held.append(record)
            return False
        return True

    def no_bar(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True})

    set_tqdm_hook = getattr(transformers_logging, "set_tqdm_hook", None)  # transformers >= 5
    previous_hook = set_tqdm_hook(no_bar) if set_tqdm_hook else None
    logger.addFilter(hold_report)
    try:
        yield
    except BaseException:
        logger.removeFilter(hold_report)
        for record in held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold_report)
        if set_tqdm_hook:
            set_tqdm_hook(previous_hook)


startup()
