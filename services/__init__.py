"""The four costmesh services; `services.mesh` composes them."""

SERVICES = ("cache", "router", "ledger", "inference")
