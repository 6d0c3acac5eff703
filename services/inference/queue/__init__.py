"""SubmitBatch through costmesh's micro-batching queue (BATCH_MODE_QUEUE).

A batch is accepted at once: it is checked, given an id, recorded, and every request
is put on the queue. A consumer takes up to `max_batch` requests, or whatever has come
`max_wait_ms` after the first of them was enqueued, and runs them through the whole
request path (cache, routing, provider, ledger) with at most `concurrency` in flight.
Each result or failure is kept `result_ttl_seconds` for GetBatch.

What a caller sends:
  - every request needs a request_id, unique in the batch: results and failures are
    matched to requests by it;
  - the batch's `feature` fills the feature of each request that has none; a request
    naming a *different* feature is refused (overriding it silently would bill the
    wrong feature, ignoring the batch's would make it meaningless). With no batch
    feature, each request names its own;
  - every request is checked as Complete would check it before anything is queued,
    so one bad request refuses the whole batch with its field named
    (`requests[3].model`), and nothing is enqueued.

Backends ([queue] backend):
  memory  an in-process deque and dicts, bounded in waiting requests; what is queued
          is lost with the process.
  redis   nothing enqueued is lost when a consumer stops or crashes. Keys, under the
          configured prefix P:
            P:stream           stream of requests, read through consumer group "costmesh";
                               an entry is acked (and deleted) only once its result is stored
            P:batch:<id>       hash: team, total, the caller's ids (JSON), created
            P:started:<id>     string: set when a request of the batch first runs
            P:results:<id>     hash: caller's request_id -> b"r" + CompleteResponse or
                               b"f" + BatchFailure
          The batch keys expire result_ttl_seconds after the last write.
          A consumer is named after its data directory (a name kept in a file there), so
          a restarted one first reads its own pending entries again; entries of a
          consumer that does not come back are claimed by any other once idle for
          `claim_idle_seconds` (XAUTOCLAIM). A live consumer keeps the entries it holds
          from being claimed by re-claiming them to itself (XCLAIM JUSTID) as it works.
"""

from services.inference.queue.items import MAX_REQUESTS, PREFIX, RULES, QueueSettings
from services.inference.queue.micro_batches import MicroBatchQueue
from services.inference.queue.redis_backend import RedisBackend

__all__ = ["MAX_REQUESTS", "PREFIX", "RULES", "MicroBatchQueue", "QueueSettings", "RedisBackend"]
