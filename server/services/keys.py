"""API keys: creation, lookup, verification, rotation, revocation.

A secret is `llm_` + 32 bytes of URL-safe randomness (256 bits). Only its SHA-256
is stored; with that much entropy a fast hash is safe and lets verification be one
indexed lookup. The first characters (`prefix`) are stored in clear so operators
can tell keys apart without ever seeing a secret again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import bindparam, or_, select
from sqlalchemy.exc import DBAPIError, IntegrityError

from server.db.engine import unreachable
from server.db.tables import ApiKey, utcnow
from server.errors import AuthenticationError, Conflict, DatabaseError, InvalidRequest, NotFound
from server.services.memo import MISSING
from server.services.sqlitereader import SqliteReader
from server.validation import check_int, is_int, parse_duration

SECRET_PREFIX = "llm_"
PREFIX_LEN = 12  # "llm_" + 8 characters shown in lists and logs
ROLES = ("admin", "user")
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "monthly_token_quota")

def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyInfo:
    """What the rest of the system knows about a key: never the secret."""

    id: int
    name: str
    prefix: str
    role: str
    allowed_models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    monthly_token_quota: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= utcnow():
            return "expired"
        return "active"

    def allows(self, model_names: set[str]) -> bool:
        return not self.allowed_models or bool(set(self.allowed_models) & model_names)

    def to_dict(self) -> dict:
        data = asdict(self)
        for field in ("expires_at", "revoked_at", "created_at", "last_used_at"):
            if data[field] is not None:
                data[field] = data[field].isoformat() + "Z"
        data["state"] = self.state
        return data

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id, name=row.name, prefix=row.prefix, role=row.role,
            allowed_models=list(row.allowed_models) if row.allowed_models else None,
            rpm=row.rpm, tpm=row.tpm, max_concurrency=row.max_concurrency,
            monthly_token_quota=row.monthly_token_quota, expires_at=row.expires_at,
            revoked_at=row.revoked_at, created_at=row.created_at, last_used_at=row.last_used_at,
        )


@dataclass(frozen=True)
class CreatedKey:
    key: KeyInfo
    secret: str  # shown once, never stored


def _check_limits(limits: dict) -> dict:
    for field, value in limits.items():
        if field not in LIMIT_FIELDS:
            raise InvalidRequest(f"{field}: not a key limit", param=field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidRequest(f"{field}: must be a non-negative integer", param=field)
        if value is not None:
            check_int(value, param=field)
    return limits


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidRequest(f"role: {role!r} is not one of {', '.join(ROLES)}", param="role")
    return role


def create_key(db, *, name: str, role: str = "user", models: list[str] | None = None,
               expires_in: str | None = None, value: str | None = None, **limits) -> CreatedKey:
    """Create a key; `value` imports a given secret instead of generating one."""
    if not name or not name.strip():
        raise InvalidRequest("name: must not be empty", param="name")
    _check_role(role)
    _check_limits(limits)
    expires_at = utcnow() + parse_duration(expires_in) if expires_in else None
    if value is not None and len(value) < 16:
        raise InvalidRequest("value: an imported key needs at least 16 characters", param="value")
    secret = value or new_secret()
    row = ApiKey(
        name=name.strip(), prefix=secret[:PREFIX_LEN], key_hash=hash_secret(secret), role=role,
        allowed_models=models or None, expires_at=expires_at, **limits,
    )
    try:
        with db.session() as s:
            s.add(row)
            s.flush()
            info = KeyInfo.from_row(row)
    except IntegrityError:
        raise Conflict(f"a key named {name!r} or with that value already exists",
                       param="name") from None
    return CreatedKey(key=info, secret=secret)


def _find_row(s, ref: str | int) -> ApiKey:
    """A key by id, name or prefix; ambiguity is an error, not a guess."""
    ref = str(ref).strip()
    if is_int(ref):
        row = s.get(ApiKey, int(ref))
        if row:
            return row
    exact = s.scalars(select(ApiKey).where(or_(ApiKey.name == ref, ApiKey.prefix == ref))).all()
    if len(exact) == 1:
        return exact[0]
    if not exact and len(ref) >= 4:
        like = s.scalars(select(ApiKey).where(ApiKey.prefix.startswith(ref))).all()
        if len(like) == 1:
            return like[0]
        if len(like) > 1:
            raise InvalidRequest(f"key {ref!r} is ambiguous: it matches {len(like)} keys",
                                 param="key")
    raise NotFound(f"no key with id, name or prefix {ref!r}", param="key")


def get_key(db, ref: str | int) -> KeyInfo:
    with db.session() as s:
        return KeyInfo.from_row(_find_row(s, ref))


def list_keys(db, *, include_revoked: bool = True) -> list[KeyInfo]:
    with db.session() as s:
        query = select(ApiKey).order_by(ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return [KeyInfo.from_row(r) for r in s.scalars(query)]


def update_key(db, ref: str | int, *, role: str | None = None, models: list[str] | None = None,
               expires_in: str | None = None, **limits) -> KeyInfo:
    """Change a key's settings. Limits given as None are left alone; 0 means unlimited."""
    if role is not None:
        _check_role(role)
    limits = _check_limits({k: v for k, v in limits.items() if v is not None})
    with db.session() as s:
        row = _find_row(s, ref)
        if role is not None:
            row.role = role
        if models is not None:
            row.allowed_models = models or None
        if expires_in is not None:
            row.expires_at = utcnow() + parse_duration(expires_in)
        for field, value in limits.items():
            setattr(row, field, value)
        s.flush()
        return KeyInfo.from_row(row)


def revoke_key(db, ref: str | int) -> KeyInfo:
    with db.session() as s:
        row = _find_row(s, ref)
        row.revoked_at = row.revoked_at or utcnow()
        s.flush()
        return KeyInfo.from_row(row)


def rotate_key(db, ref: str | int) -> CreatedKey:
    """A new secret for the same key (id, name, limits, usage); the old one dies at once."""
    secret = new_secret()
    with db.session() as s:
        row = _find_row(s, ref)
        if row.revoked_at:
            raise InvalidRequest(f"key {row.name!r} is revoked and cannot be rotated", param="key")
        row.key_hash = hash_secret(secret)
        row.prefix = secret[:PREFIX_LEN]
        s.flush()
        return CreatedKey(key=KeyInfo.from_row(row), secret=secret)


_BY_HASH = select(ApiKey.__table__).where(ApiKey.key_hash == bindparam("h"))
_KEY_FIELDS = ("id", "name", "prefix", "role", "allowed_models", "rpm", "tpm",
               "max_concurrency", "monthly_token_quota", "expires_at", "revoked_at",
               "created_at", "last_used_at")
_BY_HASH_SQL = f"SELECT key_hash, {', '.join(_KEY_FIELDS)} FROM api_keys WHERE key_hash = ?"


def _find(db, digest: str) -> tuple[str, KeyInfo] | None:
    db.ensure_schema()
    with db.connect() as conn:
        row = conn.execute(_BY_HASH, {"h": digest}).first()
    return None if row is None else (row.key_hash, KeyInfo.from_row(row))


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _find_sqlite(reader: SqliteReader, digest: str) -> tuple[str, KeyInfo] | None:
    """`_find` through a plain sqlite3 connection: the same row, converted the way
    SQLAlchemy's column types would (JSON text, ISO datetimes)."""
    row = reader.one(_BY_HASH_SQL, (digest,))
    if row is None:
        return None
    (key_hash, id_, name, prefix, role, models, rpm, tpm, conc, quota, expires, revoked,
     created, last_used) = row
    models = json.loads(models) if models is not None else None
    return key_hash, KeyInfo(
        id=id_, name=name, prefix=prefix, role=role,
        allowed_models=list(models) if models else None, rpm=rpm, tpm=tpm,
        max_concurrency=conc, monthly_token_quota=quota, expires_at=_when(expires),
        revoked_at=_when(revoked), created_at=_when(created), last_used_at=_when(last_used))


class KeyLookup:
    """`_find_sqlite` for the request path, remembering what it read until the database
    changes.

    Every request reads its key; most requests present a key seen a moment ago. A
    remembered row is used only while the database's data_version is unchanged, i.e.
    until any connection in any process commits (a revoke, a rotation, a limit change,
    or just the request-log writer, a few times a second), so nothing is ever served
    stale: a changed key is read again on its next request. Expiry is checked on every
    request (verify_key), as before."""

    def __init__(self, reader: SqliteReader, *, max_entries: int = 10_000):
        self.reader = reader
        self.max_entries = max_entries
        self._version: int | None = None
        self._found: dict[str, tuple[str, KeyInfo] | None] = {}

    def find(self, digest: str) -> tuple[str, KeyInfo] | None:
        version = self.reader.data_version()
        if version != self._version:
            self._found.clear()
            self._version = version
        found = self._found.get(digest, MISSING)
        if found is MISSING:
            found = _find_sqlite(self.reader, digest)
            if len(self._found) < self.max_entries:
                self._found[digest] = found
        return found

    def close(self) -> None:
        self.reader.close()


class RecentKeys:
    """`_find` for the request path on a server database (Postgres), answering from the
    row last read for a key only while the database cannot be reached.

    Without it a database outage locks out every client, although a key's row cannot
    change while no write reaches the database (LiteLLM's proxy has the same switch,
    `allow_requests_on_db_unavailable`). Keys without a monthly quota are then served,
    and their request logs wait in the writer's backlog and journal until the database
    returns; keys with a quota are still refused (503), because a reservation needs the
    database. Every successful read replaces the row, so a revoke applies on the key's
    next request once the database answers. A key never read by this process is refused
    (503) during an outage."""

    def __init__(self, db, *, max_entries: int = 10_000):
        self.db = db
        self.max_entries = max_entries
        self._rows: dict[str, tuple[str, KeyInfo]] = {}

    def find(self, digest: str) -> tuple[str, KeyInfo] | None:
        try:
            found = _find(self.db, digest)
        except (DBAPIError, DatabaseError) as exc:
            if isinstance(exc, DBAPIError) and not unreachable(exc):
                raise
            if digest not in self._rows:
                raise DatabaseError("the database is unavailable") from None
            return self._rows[digest]
        self._rows.pop(digest, None)
        if found is not None:
            if len(self._rows) >= self.max_entries:  # forget the least recently read
                del self._rows[next(iter(self._rows))]
            self._rows[digest] = found
        return found

    def close(self) -> None:
        pass


def verify_key(db, secret: str | None, *,
               lookup: KeyLookup | RecentKeys | None = None) -> KeyInfo:
    """The active key for a presented secret, or AuthenticationError.

    `lookup` is the request path's reader: on embedded SQLite it reads through a plain
    sqlite3 connection and remembers rows until the database changes (KeyLookup); on a
    server database it reads every time and falls back on the last row read only
    while the database is unreachable (RecentKeys)."""
    if not secret:
        raise AuthenticationError(
            "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    digest = hash_secret(secret)
    found = lookup.find(digest) if lookup is not None else _find(db, digest)
    # The lookup is by hash; compare again in constant time so timing says
    # nothing about how much of a guess matched.
    if found is None or not hmac.compare_digest(found[0], digest):
        raise AuthenticationError("invalid API key")
    info = found[1]
    if info.state == "revoked":
        raise AuthenticationError("this API key has been revoked", code="key_revoked")
    if info.state == "expired":
        raise AuthenticationError("this API key has expired", code="key_expired")
    return info
