"""Who may call which RPC: one table, enforced at the edge for every call on either
transport, shown in docs/security.md and checked RPC by RPC in tests/common/test_access.py.

Callers are API keys (a team's `member` or `admin`) or the services themselves (the
service key). A service is told apart by the name on its mTLS client certificate;
over a connection without one (plaintext on loopback, or TLS without a client CA),
the service key alone is the identity and stands for every service."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from services.common.auth import Principal
from services.common.errors import PermissionDenied

MEMBER, ADMIN = "member", "admin"
INFERENCE = "service:inference"  # the service key, from inference
audit = logging.getLogger("costmesh.audit")

_INFERENCE = "/costmesh.inference.v1.InferenceService/"
_CACHE = "/costmesh.cache.v1.CacheService/"
_ROUTER = "/costmesh.router.v1.RouterService/"
_LEDGER = "/costmesh.ledger.v1.LedgerService/"
# An RPC missing here is refused to everyone (and fails the test that checks the table).
ACCESS: Mapping[str, frozenset[str]] = {
    method: frozenset(grants)
    for method, grants in {
        _INFERENCE + "Complete": (MEMBER, ADMIN),
        _INFERENCE + "StreamComplete": (MEMBER, ADMIN),
        _INFERENCE + "SubmitBatch": (MEMBER, ADMIN),
        _INFERENCE + "GetBatch": (MEMBER, ADMIN),
        _INFERENCE + "ReportWrongHit": (MEMBER, ADMIN),
        # A team's cache: inference, and admins for diagnostics (naming the team; logged).
        _CACHE + "Lookup": (INFERENCE, ADMIN),
        _CACHE + "Store": (INFERENCE, ADMIN),
        _CACHE + "Invalidate": (INFERENCE, ADMIN),
        _CACHE + "GetStats": (INFERENCE, ADMIN),
        _CACHE + "ReportWrongHit": (INFERENCE, ADMIN),
        # Route may call a provider (the `llm` classifier): only inference, which bills it.
        _ROUTER + "Route": (INFERENCE,),
        _ROUTER + "GetRouteStats": (MEMBER, ADMIN, INFERENCE),
        # Only inference writes ledger rows; members read their own team's.
        _LEDGER + "RecordUsage": (INFERENCE,),
        _LEDGER + "QuerySpend": (MEMBER, ADMIN, INFERENCE),
        _LEDGER + "ExportUsage": (MEMBER, ADMIN),
    }.items()
}


NO_CERTIFICATE = ""  # Principal.service of the service key over a connection without one


def grant_of(principal: Principal) -> str:
    """The name the table grants to: a role, or service:<name> for a service."""
    if principal.role != "service":
        return principal.role
    if principal.service == NO_CERTIFICATE:
        return "service (no certificate)"
    return f"service:{principal.service}"


def check(method: str, principal: Principal, table: Mapping[str, frozenset[str]] = ACCESS) -> None:
    """PERMISSION_DENIED unless the table lets `principal` call `method`."""
    grants = table.get(method, frozenset())
    mine = grant_of(principal)
    if mine in grants:
        return
    no_certificate = principal.role == "service" and principal.service == NO_CERTIFICATE
    if no_certificate and any(g.startswith("service:") for g in grants):
        return  # nothing tells services apart: the key stands for each
    allowed = ", ".join(sorted(grants)) or "nobody"
    raise PermissionDenied(
        f"{method.rsplit('/', 1)[-1]}: not allowed for {mine} (allowed: {allowed})",
        reason="ROLE_NOT_ALLOWED",
    )
