"""The request journal: append-only files in `LLMCTL_HOME/journal` that hold every
finished request's log record until the database has it.

The log writer (server/services/logstore.py) appends each record here before the
response's last byte is sent, so what a client received survives the gateway being
killed; records it cannot keep in memory (the database is down and the in-memory
backlog is full) live only here until they are replayed. Replaying is idempotent: a
record is inserted under its unique request id, and its usage and quota are settled
in the same transaction only when the insert happened.

Files are segments named `<owner>.<n>.jsonl`, one JSON object per line. A process
owns its segments while it holds an exclusive lock on `<owner>.lock`; a segment is
deleted once every record in it is in the database. The segments of an owner whose
lock is free (the process died) are adopted by the next gateway that starts on the
same home and replayed. Lines are written with one `write(2)` each, so they reach
the kernel before the response completes: they survive the process, not a power
loss of the machine.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path

log = logging.getLogger("llmctl.logs")


@dataclasses.dataclass(eq=False)
class Segment:
    path: Path
    fd: int | None = None  # open for appending while it is the active segment
    lines: int = 0  # records appended (or found, for an adopted segment)
    outstanding: int = 0  # records not yet known to be in the database
    on_disk_only: int = 0  # of those, records the writer does not hold in memory


class Journal:
    def __init__(self, directory: Path, *, segment_lines: int = 20_000):
        self.dir = Path(directory)
        self.segment_lines = segment_lines
        self.owner = f"{os.getpid()}-{time.time_ns()}"
        self._seq = 0
        self._lock_fd: int | None = None
        self.active: Segment | None = None
        self.sealed: list[Segment] = []

    def open(self) -> list[Segment]:
        """Take ownership of a fresh name; adopt the segments of dead owners and return
        them (every line of them still to be written)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # records may hold prompts (LLMCTL_LOG_PROMPTS)
        # Locked before it has its name, so no other process ever sees it unlocked.
        tmp = self.dir / f"{self.owner}.lock.tmp"
        self._lock_fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, self.dir / f"{self.owner}.lock")
        adopted = []
        for lock in sorted(self.dir.glob("*.lock")):
            owner = lock.name.removesuffix(".lock")
            if owner == self.owner or not _is_orphan(lock):
                continue
            for path in sorted(self.dir.glob(f"{owner}.*.jsonl"), key=_seq_of):
                seg = self._new_path()
                try:  # atomic: two gateways starting at once cannot both adopt it
                    os.rename(path, seg.path)
                except FileNotFoundError:
                    continue
                seg.lines = seg.outstanding = seg.on_disk_only = _count_lines(seg.path)
                adopted.append(seg)
            lock.unlink(missing_ok=True)
        self.sealed.extend(adopted)
        return adopted

    def _new_path(self) -> Segment:
        self._seq += 1
        return Segment(self.dir / f"{self.owner}.{self._seq}.jsonl")

    def append(self, record) -> Segment:
        """Write one record; the segment it went to."""
        seg = self.active
        if seg is None or seg.lines >= self.segment_lines:
            self.seal()
            seg = self.active = self._new_path()
            seg.fd = os.open(seg.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        os.write(seg.fd, encode(record))
        seg.lines += 1
        seg.outstanding += 1
        return seg

    def seal(self) -> None:
        """Close the active segment to appends (a new one opens on the next record)."""
        seg, self.active = self.active, None
        if seg is not None:
            os.close(seg.fd)
            seg.fd = None
            self.sealed.append(seg)
            self._collect(seg)

    def done(self, seg: Segment, n: int = 1) -> None:
        """`n` records of `seg` are in the database."""
        seg.outstanding -= n
        self._collect(seg)

    def _collect(self, seg: Segment) -> None:
        if seg.fd is None and seg.outstanding <= 0 and seg in self.sealed:
            self.sealed.remove(seg)
            seg.path.unlink(missing_ok=True)

    def to_replay(self) -> list[Segment]:
        """Sealed segments holding records that are only on disk, oldest first."""
        return [s for s in self.sealed if s.on_disk_only > 0]

    def close(self) -> None:
        """Seal; delete what is fully written; keep the rest (and free the owner lock,
        so that the next start adopts it)."""
        self.seal()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            if not self.sealed:
                (self.dir / f"{self.owner}.lock").unlink(missing_ok=True)


def _is_orphan(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _seq_of(path: Path) -> int:
    return int(path.name.split(".")[-2])


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


@functools.cache
def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def encode(record) -> bytes:
    """One JSON line; field names kept, so a journal outlives a change of fields.
    (dataclasses.asdict deep-copies every value: 4x slower on the request path.)"""
    data = {name: getattr(record, name) for name in _names(type(record))}
    return json.dumps(data, separators=(",", ":"), default=datetime.isoformat).encode() + b"\n"


def read(path: Path, record_type) -> list:
    """A segment's records. A line cut short by a crash belongs to a response that
    never completed: it is skipped."""
    records = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                log.warning("journal %s: skipping a line cut short", path.name)
                continue
            data = json.loads(line)
            data["created_at"] = datetime.fromisoformat(data["created_at"])
            known = _names(record_type)
            records.append(record_type(**{k: v for k, v in data.items() if k in known}))
    return records
