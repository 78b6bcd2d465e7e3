"""Optional dependencies (pyproject's extras): import one, or say which extra installs it.

Serving needs none of them; `llmctl eval` needs the `eval` extra, `bench serve
--plot` the `bench` extra. A missing one is a one-line error, not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from server.errors import LlmctlError


class MissingExtra(LlmctlError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, which the `extra` extra installs, for `needed_for`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0]:
            raise  # installed, but something it imports is broken: show that
        raise MissingExtra(f"{needed_for} needs {exc.name}, which the '{extra}' extra installs: "
                           f"pip install 'llmctl[{extra}]'") from None
