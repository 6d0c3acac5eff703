"""Replay a recorded workload through a running mesh under the baseline policy (the
control arm) and the optimised one (the treatment), then read back what the ledger
recorded: the savings report is built from the ledger's rows, never from the replay's
own tally, so it says what chargeback will say.

Each request is sent as itself: its feature, messages and max_tokens, with a request id
made of the experiment, the workload id and the arm, so a report can tie every ledger
row back to its label and true tier.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import grpc

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator.realism import LABEL as SIMULATED_LABEL
from costmesh_tools.casestudy import arms
from costmesh_tools.casestudy.quality import Truth
from costmesh_tools.casestudy.workload import WorkloadRequest
from services.inference.experiments import ARM_NAMES

CONTROL, TREATMENT = types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT
# How long a replay waits for the ledger to hold every answered request's row.
LEDGER_WAIT_SECONDS = 60.0
SECONDS_PER_DAY = 86_400
# A workload spanning less than this has no daily volume of its own to project to.
MIN_SPAN_SECONDS = 3_600
# A replayed call's deadline: generous, the realistic simulator takes seconds.
CALL_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Planned:
    """One call of the replay: a workload request in an arm."""

    request: WorkloadRequest
    arm: types_pb2.Arm.ValueType

    def request_id(self, experiment: str) -> str:
        return arms.request_id(experiment, ARM_NAMES[self.arm], self.request.id)


@dataclass
class Outcome:
    """What the replay saw: answers, failures by status, simulated answers, and the
    cost the replies confirmed (those without cost_pending)."""

    experiment: str
    sent: int = 0
    answered: int = 0
    simulated: int = 0
    confirmed_cost_nano_usd: int = 0
    answered_ids: set[str] = field(default_factory=set)  # request ids answered
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def plan(
    workload: Sequence[WorkloadRequest], mode: str, control_share: float, seed: int
) -> list[Planned]:
    """`both`: every request under both policies; `split`: each request in one arm,
    control with probability `control_share` (seeded, so a replay can be repeated)."""
    if mode == "both":
        return [Planned(r, arm) for r in workload for arm in (CONTROL, TREATMENT)]
    if mode != "split":
        raise ValueError(f"mode: expected both or split, got {mode!r}")
    if not 0.0 < control_share < 1.0:
        raise ValueError("control share: must be between 0 and 1 (exclusive) for a split")
    draw = random.Random(seed)
    return [Planned(r, CONTROL if draw.random() < control_share else TREATMENT) for r in workload]


def answered_in_one_arm(planned: Sequence[Planned], outcome: Outcome) -> int:
    """Workload requests of a `both` replay answered in one arm and failed in the other."""
    arms_answered = Counter(
        p.request.id for p in planned if p.request_id(outcome.experiment) in outcome.answered_ids
    )
    return sum(1 for n in arms_answered.values() if n == 1)


def truth(planned: Sequence[Planned], experiment: str) -> dict[str, Truth]:
    """Each call's label and true tier, by the request id it was sent with."""
    return {p.request_id(experiment): Truth(p.request.label, p.request.tier) for p in planned}


def workload_span_seconds(workload: Sequence[WorkloadRequest]) -> float:
    times = [r.timestamp for r in workload]
    return (max(times) - min(times)).total_seconds() if times else 0.0


def requests_per_day(workload: Sequence[WorkloadRequest]) -> Decimal:
    """The workload's own daily volume: its requests over the span of its timestamps.
    ValueError when it spans less than an hour: too short to say a daily volume."""
    span = workload_span_seconds(workload)
    if span < MIN_SPAN_SECONDS:
        raise ValueError(
            f"the workload spans {span:.0f} s, less than an hour: too short to project a "
            "daily volume from; give --requests-per-day"
        )
    return Decimal(len(workload)) * SECONDS_PER_DAY / Decimal(str(span))


def volume_basis(workload: Sequence[WorkloadRequest]) -> str:
    """Where requests_per_day(workload) comes from, for the report."""
    hours = workload_span_seconds(workload) / 3600
    return f"the workload's own volume: {len(workload)} requests over {hours:.2f} hours"


async def recorded_calls(
    channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]], experiment: str
) -> int:
    """The rows the ledger already holds for `experiment` (a refused key raises)."""
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    spend = await stub.QuerySpend(
        ledger_pb2.QuerySpendRequest(experiment=experiment), metadata=metadata, timeout=30
    )
    return sum(row.calls for row in spend.rows)


async def send_all(
    channel: grpc.aio.Channel,
    metadata: Sequence[tuple[str, str]],
    planned: Sequence[Planned],
    experiment: str,
    *,
    concurrency: int,
    speed: float | None,
    progress: Callable[[int, int], None],
    change: Callable[[inference_pb2.CompleteRequest], inference_pb2.CompleteRequest] = (
        lambda call: call
    ),
) -> Outcome:
    """Send every planned call, at most `concurrency` at once; with a `speed`, each at
    its recorded time divided by it (None: as fast as the mesh answers). `change` alters
    each request before it is sent (an ablation switches a lever off)."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    outcome = Outcome(experiment)
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    first = min((p.request.timestamp for p in planned), default=None)

    async def one(call: Planned) -> None:
        if speed is not None and first is not None:
            due = (call.request.timestamp - first).total_seconds() / speed
            await asyncio.sleep(max(0.0, started + due - time.monotonic()))
        async with gate:
            try:
                reply = await stub.Complete(
                    change(arms.complete_request(call.request, experiment, call.arm)),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as exc:
                outcome.failures[exc.code().name] += 1
            except Exception as exc:  # one call's fault is a failure, not the replay's end
                outcome.failures[type(exc).__name__] += 1
            else:
                outcome.answered += 1
                outcome.answered_ids.add(call.request_id(experiment))
                outcome.simulated += reply.content.startswith(SIMULATED_LABEL)
                if not reply.cost_pending:
                    outcome.confirmed_cost_nano_usd += reply.cost_nano_usd
            outcome.sent += 1
            progress(outcome.sent, len(planned))

    await asyncio.gather(*(one(p) for p in planned))
    outcome.seconds = time.monotonic() - started
    return outcome


async def ledger_rows(
    channel: grpc.aio.Channel,
    metadata: Sequence[tuple[str, str]],
    experiment: str,
    answered: int,
    *,
    wait_seconds: float = LEDGER_WAIT_SECONDS,
    cost_nano_usd: int = 0,
) -> list[ledger_pb2.UsageRecord]:
    """The experiment's rows, once the ledger holds one answer row per answered call
    and at least `cost_nano_usd` (the replies' confirmed cost, overhead rows included).

    Inference records usage just after it replies, so the last rows can trail the last
    answers by moments (longer through a ledger outage: then this gives up, saying so).
    """
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    deadline = time.monotonic() + wait_seconds
    while True:
        spend = await stub.QuerySpend(
            ledger_pb2.QuerySpendRequest(experiment=experiment), metadata=metadata, timeout=30
        )
        recorded = sum(row.calls for row in spend.rows)
        if recorded >= answered and spend.total_cost_nano_usd >= cost_nano_usd:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the ledger holds {recorded} of {answered} answers of experiment "
                f"{experiment!r} ({spend.total_cost_nano_usd} of {cost_nano_usd} nano-USD) "
                f"after {wait_seconds:.0f} s; the rest wait in inference's outbox (is the "
                "ledger reachable?)"
            )
        await asyncio.sleep(0.2)  # polled: the rows arrive on inference's schedule
    export = stub.ExportUsage(
        ledger_pb2.ExportUsageRequest(experiment=experiment), metadata=metadata, timeout=120
    )
    return [item.record async for item in export]
