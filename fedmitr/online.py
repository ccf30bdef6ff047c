"""Is the Hugging Face Hub there? Asked at once, without torch, before anything waits on it.

Without these checks an offline machine spends half a minute in the Hub clients' retries (five
retry blocks for a dataset) before it says so; with them a command that needs the Hub answers in
one line at once, and says what works offline.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from fedmitr.catalog import BUNDLED, hub_spec
from fedmitr.errors import DatasetUnavailable, excerpt

__all__ = ["hub_dataset_cached", "hub_offline", "hub_reachable", "require_hub_dataset"]

_ON = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face Hub (checked without touching the network)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.strip().lower() in _ON for f in flags)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout_s``.

    Asked before any Hub call that may wait: without it an offline machine spends ~25 s in the Hub
    client's retries before it says so.
    """
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((host.hostname, host.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _cache_home() -> Path:
    """``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``: where
    huggingface_hub and datasets keep their caches (read now, not at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home)))


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def hub_dataset_cached(hub_id: str) -> bool:
    """Whether this machine holds a local copy of the Hub dataset ``hub_id`` ("owner/name"): its
    files in the Hub cache, or a dataset ``datasets`` prepared from them (which it loads offline)."""
    owner, _, name = hub_id.partition("/")
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                     or _cache_home() / "hub").expanduser()
    if (hub_cache / f"datasets--{owner}--{name}").is_dir():
        return True
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or _cache_home() / "datasets").expanduser()
    # datasets names the folder "<owner>___<name in snake case>"
    return prepared.is_dir() and any(path.is_dir() and _plain(path.name.partition("___")[2]) == _plain(name)
                                     for path in prepared.glob(f"{owner}___*"))


def require_hub_dataset(name: str) -> None:
    """Refuse at once, in one line, a Hub dataset (a registry name or ``hf:owner/name``) that this
    machine cannot get: the Hub is off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set) or does not
    answer, and no local copy is cached. Returns when it can be loaded, or at least tried."""
    hub_id = hub_spec(name).hub_id
    if hub_offline():
        why = "the Hub is off for this machine (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
    elif not hub_reachable():
        why = "the Hub does not answer from this machine (no network?)"
    else:
        return
    if hub_dataset_cached(hub_id):
        return  # datasets loads the cached copy
    raise DatasetUnavailable(
        f"dataset {excerpt(name)} comes from the Hugging Face Hub ({excerpt(hub_id)}), but {why} and this machine "
        f"has no cached copy of it; offline, use a bundled dataset: {', '.join(BUNDLED)}"
    )
