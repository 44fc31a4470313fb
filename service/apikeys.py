"""API keys: created by an operator, shown once, stored hashed, checked in constant time.

A key reads ``kgdx_<key_id>_<secret>``: ``key_id`` is 12 random hex digits, public (it is
listed, logged and audited) and used to find the row; ``secret`` is 32 random bytes,
URL-safe base64, and never stored, printed again or logged. The row keeps
``HMAC-SHA256(salt, secret)`` with a random per-key salt.

Why HMAC and not a slow password hash (scrypt, PBKDF2): slow hashes protect *guessable*
secrets by making each guess expensive. A 256-bit random secret cannot be guessed whatever
the hash costs, so a fast keyed hash is as safe against a stolen table, and it keeps the
check at microseconds on every request instead of tens of milliseconds.

Example::

    keys = ApiKeyStore(db)
    record, plaintext = keys.create("orthanc", ["ingest"])
    key = keys.verify(request_header_value)       # None unless valid and not revoked
    if key is None or not has_scope(key, "ingest"): ...
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from service.db import NAME_MAX, ServiceDatabase, api_keys, utcnow

__all__ = [
    "SCOPES",
    "ApiKey",
    "ApiKeyNotFoundError",
    "ApiKeyStore",
    "has_scope",
    "parse_key",
]

log = logging.getLogger(__name__)

#: What a key may do; ``admin`` implies the others.
SCOPES = ("predict", "ingest", "admin")
#: Hex digits of the public key id.
KEY_ID_HEX = 12
#: Random bytes of the secret.
SECRET_BYTES = 32
#: ``last_used_at`` is written at most this often per key, to keep checks read-only.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_KEY = re.compile(rf"kgdx_(?P<key_id>[0-9a-f]{{{KEY_ID_HEX}}})_(?P<secret>[A-Za-z0-9_-]{{43,86}})")
_MAX_PRESENTED = 200
# Compared against when the key id is unknown, so that path costs the same as a wrong secret.
_DUMMY_SALT = secrets.token_hex(16)
_DUMMY_HASH = "0" * 64


class ApiKeyNotFoundError(ValueError):
    """No key has this id, and no active key has this name."""


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored, without its secret.

    Args:
        key_id: public id, the part between ``kgdx_`` and the secret.
        name: operator's label, unique among active keys.
        scopes: granted scopes, in :data:`SCOPES` order.
        created_at: ISO 8601, UTC.
        revoked: whether the key was revoked (it then never verifies).
        last_used_at: ISO 8601, UTC, to the minute at best; ``None`` if never used.
    """

    key_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: str
    revoked: bool
    last_used_at: str | None


def has_scope(key: ApiKey, scope: str) -> bool:
    """Whether ``key`` grants ``scope``: revoked keys grant nothing, ``admin`` grants all.

    Raises:
        ValueError: ``scope`` is not one of :data:`SCOPES`.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    if key.revoked:
        return False
    return scope in key.scopes or "admin" in key.scopes


def parse_key(presented: object) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else ``None``; never raises."""
    if not isinstance(presented, str) or len(presented) > _MAX_PRESENTED:
        return None
    m = _KEY.fullmatch(presented.strip())
    return None if m is None else (m["key_id"], m["secret"])


def _hash(salt: str, secret: str) -> str:
    return hmac.new(salt.encode("ascii"), secret.encode("ascii"), hashlib.sha256).hexdigest()


class ApiKeyStore:
    """API keys in ``svc_api_keys`` of a :class:`~service.db.ServiceDatabase`."""

    def __init__(self, db: ServiceDatabase):
        self.db = db

    def create(self, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """Create a key; returns its record and the plaintext key, which exists only here.

        Raises:
            ValueError: empty or over-long name, a name an active key already has, no scope
                or an unknown one.
        """
        clean_name = _check_name(name)
        granted = _check_scopes(scopes)
        for _ in range(5):  # a key id collision is astronomically rare; retry anyway
            key_id = secrets.token_hex(KEY_ID_HEX // 2)
            secret = secrets.token_urlsafe(SECRET_BYTES)
            salt = secrets.token_hex(16)
            now = utcnow()
            try:
                with self.db.write() as conn:
                    taken = conn.execute(
                        select(api_keys.c.key_id).where(
                            api_keys.c.name == clean_name, api_keys.c.revoked_at.is_(None)
                        )
                    ).first()
                    if taken is not None:
                        raise ValueError(_duplicate(clean_name, str(taken[0])))
                    if conn.execute(
                        select(api_keys.c.key_id).where(api_keys.c.key_id == key_id)
                    ).first():
                        continue
                    conn.execute(
                        api_keys.insert().values(
                            key_id=key_id,
                            name=clean_name,
                            scopes=" ".join(granted),
                            salt=salt,
                            secret_hash=_hash(salt, secret),
                            created_at=now,
                        )
                    )
            except IntegrityError:
                # A concurrent create took the name (the partial unique index said so).
                raise ValueError(_duplicate(clean_name, None)) from None
            record = ApiKey(key_id, clean_name, granted, now, False, None)
            return record, f"kgdx_{key_id}_{secret}"
        raise RuntimeError("could not draw an unused API key id")

    def verify(self, presented: str) -> ApiKey | None:
        """The key ``presented`` is, if it is valid and not revoked; else ``None``; stamps its
        ``last_used_at`` (see :meth:`touch`).

        Never raises on bad input. The secret's hash is compared with
        :func:`hmac.compare_digest`; an unknown key id costs the same comparison.
        """
        key = self.find(presented)
        return None if key is None else self.touch(key)

    def find(self, presented: str) -> ApiKey | None:
        """:meth:`verify` without the ``last_used_at`` stamp: one indexed read, no write."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        try:
            row = self.db.read_one(api_keys, api_keys.c.key_id, key_id)
        except SQLAlchemyError as exc:
            log.warning("API key lookup failed: %s", type(exc).__name__)
            return None
        salt, stored = (_DUMMY_SALT, _DUMMY_HASH) if row is None else (row.salt, row.secret_hash)
        matches = hmac.compare_digest(_hash(salt, secret), stored)
        if row is None or not matches or row.revoked_at is not None:
            return None
        return _to_key(row)

    @staticmethod
    def stamp_due(key: ApiKey) -> bool:
        """Whether :meth:`touch` would write: ``last_used_at`` is unset or older than
        :data:`LAST_USED_RESOLUTION`."""
        if key.last_used_at is None:
            return True
        try:
            return datetime.now(UTC) - datetime.fromisoformat(key.last_used_at) >= (
                LAST_USED_RESOLUTION
            )
        except ValueError:
            return True

    def touch(self, key: ApiKey) -> ApiKey:
        """Stamp ``last_used_at`` if it is older than :data:`LAST_USED_RESOLUTION`."""
        if not self.stamp_due(key):
            return key
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="microseconds")
        cutoff = (now - LAST_USED_RESOLUTION).isoformat(timespec="microseconds")
        try:
            with self.db.write(durable=False) as conn:  # bookkeeping: a lost stamp is harmless
                conn.execute(
                    update(api_keys)
                    .where(
                        api_keys.c.key_id == key.key_id,
                        (api_keys.c.last_used_at.is_(None)) | (api_keys.c.last_used_at < cutoff),
                    )
                    .values(last_used_at=stamp)
                )
        except SQLAlchemyError as exc:  # bookkeeping only: the key is still valid
            log.warning("could not stamp API key %s as used: %s", key.key_id, type(exc).__name__)
            return key
        return ApiKey(key.key_id, key.name, key.scopes, key.created_at, key.revoked, stamp)

    def list(self) -> list[ApiKey]:
        """Every key, active and revoked, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
            ).all()
        return [_to_key(r) for r in rows]

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, ``None`` if there is none."""
        if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{1,32}", key_id):
            return None
        with self.db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return None if row is None else _to_key(row)

    def revoke(self, key_id_or_name: str) -> ApiKey:
        """Revoke the key with this id, or the active key with this name; returns it.

        Revoking a revoked key is a no-op that returns it.

        Raises:
            ApiKeyNotFoundError: no key has this id and no active key this name.
        """
        if not isinstance(key_id_or_name, str) or not key_id_or_name.strip():
            raise ApiKeyNotFoundError(f"give a key id or name to revoke, got {key_id_or_name!r}")
        wanted = key_id_or_name.strip()
        # A whole key pasted by mistake: use its id, and never echo the secret.
        parsed = parse_key(wanted)
        if parsed is not None:
            wanted = parsed[0]
        with self.db.write() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == wanted)).first()
            if row is None:
                row = conn.execute(
                    select(api_keys).where(
                        api_keys.c.name == wanted, api_keys.c.revoked_at.is_(None)
                    )
                ).first()
            if row is None:
                if wanted.startswith("kgdx_"):  # a mangled key: do not echo any of it
                    raise ApiKeyNotFoundError(
                        "that is not a known API key id or name; see `kgdx apikey list`"
                    )
                raise ApiKeyNotFoundError(
                    f"no API key with id {wanted!r} and no active key named {wanted!r}; "
                    "see `kgdx apikey list`"
                )
            if row.revoked_at is None:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.key_id == row.key_id)
                    .values(revoked_at=utcnow())
                )
        key = _to_key(row)
        return ApiKey(key.key_id, key.name, key.scopes, key.created_at, True, key.last_used_at)


def _to_key(row: Row[Any]) -> ApiKey:
    return ApiKey(
        key_id=row.key_id,
        name=row.name,
        scopes=tuple(row.scopes.split()),
        created_at=row.created_at,
        revoked=row.revoked_at is not None,
        last_used_at=row.last_used_at,
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"API key name must be a non-empty string, got {name!r}")
    clean = name.strip()
    if len(clean) > NAME_MAX:
        raise ValueError(f"API key name must have at most {NAME_MAX} characters, got {len(clean)}")
    if any(unicodedata.category(c).startswith("C") for c in clean):
        raise ValueError("API key name must not contain control characters")
    if parse_key(clean) is not None:
        raise ValueError("API key name must not be an API key")
    return clean


def _check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        scopes = [scopes]
    given = list(scopes)
    if not given:
        raise ValueError(f"give at least one scope; valid scopes: {', '.join(SCOPES)}")
    for s in given:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r}; valid scopes: {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in given)


def _duplicate(name: str, key_id: str | None) -> str:
    which = f" ({key_id})" if key_id else ""
    return (
        f"an active API key named {name!r} already exists{which}; "
        "revoke it first or choose another name"
    )
