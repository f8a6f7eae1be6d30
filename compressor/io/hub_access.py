"""Reaching the Hugging Face Hub: decide up front whether it is reachable, so that an offline machine gets the local
cache (or one clean error) at once instead of minutes of retries."""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_requested() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in _OFFLINE_VARIABLES)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint ($HF_ENDPOINT, default huggingface.co) opens within `timeout`."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable():
    """Within the block, huggingface_hub and datasets use only their caches when the Hub cannot be reached;
    yields whether they are offline."""
    if not (offline_requested() or not hub_reachable()):
        yield False
        return
    with offline():
        yield True


@contextlib.contextmanager
def offline():
    """Within the block, huggingface_hub and datasets use only their local caches (nothing is downloaded)."""
    import huggingface_hub.constants as hub_constants

    patched = [(hub_constants, "HF_HUB_OFFLINE")]
    with contextlib.suppress(ImportError):
        import datasets.config

        patched.append((datasets.config, "HF_HUB_OFFLINE"))
    saved = [(module, name, getattr(module, name, None)) for module, name in patched]
    for module, name in patched:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
