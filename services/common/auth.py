"""API keys: stored hashed, each mapped to a team and a role; the team is never caller-chosen."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from services.common.config import Config, ConfigError
from services.common.errors import PermissionDenied, Unauthenticated

ROLES = ("member", "admin", "service")
SERVICE_TEAM = "costmesh"
_current: ContextVar[Principal | None] = ContextVar("costmesh_principal", default=None)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the team that pays and what it may do; for the service key,
    which service (its mTLS certificate's name; "" when the connection has none)."""

    team: str
    role: str
    service: str = ""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "cm_" + secrets.token_urlsafe(24)


class KeyTable:
    """Looks a presented key up by its SHA-256 digest."""

    def __init__(self, principals_by_digest: Mapping[str, Principal]) -> None:
        self._by_digest = dict(principals_by_digest)

    @classmethod
    def from_config(cls, auth: Config, service_key: str | None) -> KeyTable:
        table: dict[str, Principal] = {}
        for entry in auth.tables("keys"):
            entry.reject_unknown({"team", "role", "sha256"})
            digest = entry.get_str("sha256").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{entry.key_name('sha256')}: expected 64 hex digits")
            team = entry.get_str("team")
            if not team:
                raise ConfigError(f"{entry.key_name('team')}: must not be empty")
            table[digest] = Principal(team, entry.get_choice("role", ROLES, "member"))
        if service_key:
            table[hash_key(service_key)] = Principal(SERVICE_TEAM, "service")
        return cls(table)

    def lookup(self, key: str) -> Principal | None:
        # A dict lookup by SHA-256 digest: timing reveals nothing usable about a
        # high-entropy key, and it stays O(1) however many keys are configured.
        return self._by_digest.get(hash_key(key))

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The principal of a call's `authorization: Bearer <key>` metadata."""
        raw = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if raw is None:
            raise Unauthenticated(
                "authorization: missing API key; send metadata 'authorization: Bearer <key>'",
                reason="API_KEY_MISSING",
            )
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Unauthenticated("authorization: not valid UTF-8") from None
        scheme, _, key = raw.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization: expected 'Bearer <key>'")
        principal = self.lookup(key.strip())
        if principal is None:
            raise Unauthenticated("authorization: unknown API key")
        return principal


def set_current(principal: Principal | None) -> object:
    return _current.set(principal)


def reset_current(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served."""
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("authorization: call was not authenticated")
    return principal


def require_role(*roles: str) -> Principal:
    principal = current_principal()
    if principal.role not in roles:
        raise PermissionDenied(f"this call needs a key with role {' or '.join(roles)}")
    return principal
