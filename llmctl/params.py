"""Option types shared by commands: choices and durations, checked by the parser so
that a bad value is a usage error naming the option as typed (`--older-than`)."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

import typer

from server.errors import InvalidRequest
from server.validation import parse_duration


class Role(StrEnum):
    admin = "admin"
    user = "user"


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    json = "json"
    csv = "csv"


def duration(text: str) -> timedelta:
    """`--older-than 90d`: a parser for typer.Option(parser=...)."""
    try:
        return parse_duration(text, param="older-than")
    except InvalidRequest as exc:  # typer names the option itself
        raise typer.BadParameter(str(exc).removeprefix("older-than: ")) from None
