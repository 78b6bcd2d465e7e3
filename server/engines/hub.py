"""Where a local model's files come from: a directory, the Hugging Face cache, or
the Hub, decided once before loading.

Without this, a name that is neither a directory nor cached goes to the Hub, and
with no network huggingface_hub retries for about 50 s before failing. Here the Hub
is probed once (a TCP connect, a few seconds at most); unreachable, the load is
cache-only and fails at once with a message that says what was looked up and where.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from server.config import ModelSpec
from server.errors import ConfigError

PROBE_TIMEOUT = 2.0  # seconds; DNS included


@dataclass(frozen=True)
class Source:
    """What to pass to from_pretrained, and whether only local files may be used."""

    name_or_path: str
    local_files_only: bool
    offline_reason: str | None = None  # why the Hub is not asked, for the error message

    def kwargs(self) -> dict:
        return {"local_files_only": self.local_files_only}

    def explain(self) -> str:
        """The failure, when from_pretrained could not find the files."""
        if not self.local_files_only or Path(self.name_or_path).is_dir():
            return ""
        from huggingface_hub import constants

        return (f"{self.name_or_path!r} is not a local directory and not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}); the Hub was not asked: "
                f"{self.offline_reason}")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """One TCP connect to the endpoint, bounded even when DNS hangs."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def resolve(spec: ModelSpec) -> Source:
    """The source of a local model's files (see the module docstring)."""
    if spec.path:
        if not Path(spec.path).is_dir():
            raise ConfigError(f"model {spec.name!r}: path {spec.path} is not a directory")
        return Source(spec.path, local_files_only=True)
    if Path(spec.id).expanduser().is_dir():
        return Source(str(Path(spec.id).expanduser()), local_files_only=True)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _truthy("TRANSFORMERS_OFFLINE"):
        return Source(spec.id, True, "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set")
    if not _reachable(constants.ENDPOINT):
        return Source(spec.id, True, f"{constants.ENDPOINT} is unreachable")
    return Source(spec.id, local_files_only=False)
