"""Before asking the Hugging Face Hub for a model: is it in the local cache, or can the hub be reached?

transformers retries an unreachable hub for about a minute before it fails (measured here: 68 s for
``medcap caption IMG --model Salesforce/blip2-opt-2.7b`` without a network). A hospital network or
an offline machine gets the answer within a second instead, with what to do.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse


class HubUnreachableError(OSError):
    """A hub model is neither a local folder nor cached, and the hub cannot be reached."""


def _reachable(host: str, port: int, seconds: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``seconds`` (DNS included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)  # a stuck resolver must not hold us
    thread.start()
    thread.join(seconds)
    return bool(result and result[0])


def check_hub_model(name_or_path: str, what: str = "model.name_or_path", seconds: float = 1.0) -> None:
    """Raise ``HubUnreachableError`` at once when ``name_or_path`` is a hub id that is not in the
    local cache while the hub is offline (``HF_HUB_OFFLINE``) or cannot be reached."""
    if Path(name_or_path).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return  # cached: transformers loads it without the network
    advice = (
        "give a local folder with the model instead (a merged `medcap export`, or a copy made with "
        "`hf download` on a machine with network), a training checkpoint, or 'tiny'"
    )
    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        raise HubUnreachableError(
            f"{what} {name_or_path!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE is set: {advice}"
        )
    url = urlparse(constants.ENDPOINT)
    if not _reachable(url.hostname or "", url.port or (443 if url.scheme == "https" else 80), seconds):
        raise HubUnreachableError(
            f"{what} {name_or_path!r} is not in the local Hugging Face cache and the hub ({constants.ENDPOINT}) "
            f"cannot be reached from this machine: {advice}; HF_HUB_OFFLINE=1 makes the cache the only source"
        )


__all__ = ["HubUnreachableError", "check_hub_model"]
