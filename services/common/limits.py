"""Limits shared by services: a value one service accepts must fit the next one."""

from __future__ import annotations

# Characters of a request id: a caller's, a ledger row's, a cache entry's source.
MAX_REQUEST_ID = 128
