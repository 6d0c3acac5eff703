"""SubmitBatch through the provider's batch API (BATCH_MODE_PROVIDER): half price, 24 hours.

A batch is checked whole (any invalid request refuses it, naming the field), each
request is routed like a Complete, and the requests go to the providers' Batch APIs as
JSONL files: one provider batch per model of each provider (OpenAI wants one model per
input file), split further only if a file would pass the provider's size limit.

Everything lives in a SQLite job store (settings.batch_store_path) written before any
provider is called and before SubmitBatch returns, so a restart resumes polling the
jobs in flight. Results are stored when their provider batch ends, and each answer is
written to the ledger once, through the outbox, under a deterministic request id
(`<batch id>:<index>`): however often GetBatch is called and whatever restarts
happen, the ledger ignores a repeat, so every answer is billed exactly once, at the
batch price. Failed lines are not billed (providers do not charge for them).
"""

from services.inference.batches.jobs import MAX_REQUESTS, MODE, PREFIX, RULES
from services.inference.batches.provider_batches import ProviderBatches

__all__ = ["MAX_REQUESTS", "MODE", "PREFIX", "RULES", "ProviderBatches"]
