"""Integers and durations from untrusted input: one set of checks for routes and commands.

Databases store 64-bit integers (SQLite raises OverflowError past them, Postgres
`NumericValueOutOfRange`), datetime arithmetic overflows past year 9999, and
`str.isdigit()` is true for characters `int()` refuses (`"¹"`). Every number that
comes from a request or a command line goes through here, so a bad one is a 400 with
the field's name (exit status 2 on the CLI), never a 500 or a traceback.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import Field

from server.errors import InvalidRequest

INT64_MAX = 2**63 - 1
MAX_DURATION_DAYS = 100 * 366  # an expiry or age beyond a century is a typo

# For pydantic bodies and queries: a limit, count or quota that fits the database.
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]

_INT = re.compile(r"[0-9]+", re.ASCII)
_DURATION = re.compile(r"\s*([0-9]+)\s*([smhdw])\s*", re.ASCII)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def is_int(text: str) -> bool:
    """ASCII digits only, and a value that fits in 64 bits."""
    return bool(_INT.fullmatch(text)) and int(text) <= INT64_MAX


def check_int(value: int, *, param: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{param}: {value} is out of range ({minimum} to {maximum})",
                             param=param)
    return value


def parse_int(text: str, *, param: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """Decimal ASCII digits in [minimum, maximum]."""
    if not _INT.fullmatch(text.strip()):
        raise InvalidRequest(f"{param}: {text!r} is not a whole number", param=param)
    return check_int(int(text), param=param, minimum=minimum, maximum=maximum)


def parse_duration(text: str, *, param: str = "expires") -> timedelta:
    """'90d', '12h', '30m', '2w', '45s' → timedelta, at most a century."""
    match = _DURATION.fullmatch(text or "")
    if not match or int(match.group(1)) <= 0:
        raise InvalidRequest(
            f"{param}: {text!r} is not a duration like 30d, 12h, 15m or 2w", param=param
        )
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise InvalidRequest(f"{param}: {text!r} is longer than {MAX_DURATION_DAYS} days",
                             param=param)
    return timedelta(seconds=seconds)
