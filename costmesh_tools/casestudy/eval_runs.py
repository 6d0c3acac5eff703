"""Runs a held-out set through a mesh in both arms of an experiment, and has the judge
grade the answers: the gRPC side of `costmesh eval`.

Each request is sent twice, named in the evaluation's experiment: once in the control
arm (the feature's baseline model, no cache, no routing) and once in the treatment arm
(what the feature is configured to do). The treatment's answers are cached under a
namespace of this run (arms.cache_namespace), so a cached answer comes from this run's
own traffic, never from an earlier run or another configuration. The judge is called
through the mesh too, so its cost is in the ledger: in the control arm of its own
experiment, that is the judge feature's baseline model, never a cached grade and never
a routed one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator.realism import LABEL as SIMULATED_LABEL
from costmesh_tools.casestudy.arms import complete_request, request_id
from costmesh_tools.casestudy.eval_judge import judge_messages, parse_grade
from costmesh_tools.casestudy.evaluate import Answer, Pair, strip_label
from costmesh_tools.casestudy.workload import WorkloadRequest
from services.inference.experiments import ARM_NAMES

JUDGE_MAX_TOKENS = 256
# The key or its role is wrong: every other call would fail the same way.
_FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
T = TypeVar("T")
Tick = Callable[[int, int], None]  # (calls done, calls in all): a progress bar


class EvalAbortError(ValueError):
    """The run cannot give a verdict (a refused key, a mesh without experiments):
    one line, exit 2."""


@dataclass(frozen=True)
class MeshClient:
    """The inference service of a mesh, and how to call it."""

    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    limit: asyncio.Semaphore  # calls in flight

    async def complete(
        self, request: inference_pb2.CompleteRequest
    ) -> inference_pb2.CompleteResponse | str:
        """The reply, or the failed call's status as `CODE: details`."""
        async with self.limit:
            try:
                reply: inference_pb2.CompleteResponse = await self.stub.Complete(
                    request, metadata=self.metadata, timeout=self.timeout
                )
            except grpc.aio.AioRpcError as exc:
                status = f"{exc.code().name}: {exc.details()}"
                if exc.code() in _FATAL:
                    raise EvalAbortError(f"the mesh refused the key: {status}") from None
                return status
        return reply


@dataclass(frozen=True)
class Run:
    """One evaluation: its experiment name."""

    experiment: str

    async def pairs(
        self, mesh: MeshClient, requests: Iterable[WorkloadRequest], progress: Tick
    ) -> list[Pair]:
        """Every request answered in both arms."""
        chosen = list(requests)
        calls = [self._answer(mesh, r, arm) for r in chosen for arm in ARM_NAMES]
        answers = await gather_or_cancel(calls, progress)
        return [
            Pair(r, control=answers[2 * i], treatment=answers[2 * i + 1])
            for i, r in enumerate(chosen)
        ]

    async def _answer(
        self, mesh: MeshClient, request: WorkloadRequest, arm: types_pb2.Arm.ValueType
    ) -> Answer:
        call = complete_request(request, self.experiment, arm)
        reply = await mesh.complete(call)
        if isinstance(reply, str):
            return Answer(error=reply)
        check_arm(reply, self.experiment, arm)
        return Answer(
            content=strip_label(reply.content),
            model=reply.model,
            cached=reply.cached,
            cost_nano_usd=reply.cost_nano_usd,
            simulated=reply.content.startswith(SIMULATED_LABEL),
        )

    async def judge(
        self, mesh: MeshClient, feature: str, pairs: Iterable[Pair], progress: Tick
    ) -> None:
        """Grades every answer that counts towards the comparison, in place."""
        todo = [
            (p.request, arm, answer)
            for p in pairs
            if not p.control.error
            for arm, answer in (("control", p.control), ("treatment", p.treatment))
            if not answer.error
        ]
        await gather_or_cancel((self._grade(mesh, feature, *item) for item in todo), progress)

    async def _grade(
        self, mesh: MeshClient, feature: str, request: WorkloadRequest, arm: str, answer: Answer
    ) -> None:
        experiment = f"{self.experiment}-judge"
        call = inference_pb2.CompleteRequest(
            request_id=request_id(experiment, arm, request.id),
            feature=feature,
            messages=judge_messages(request, answer.content),
            experiment=experiment,
            arm=types_pb2.ARM_CONTROL,
            cache_control=inference_pb2.CacheControl(no_cache=True, no_store=True),
        )
        call.params.max_tokens, call.params.temperature = JUDGE_MAX_TOKENS, 0.0
        reply = await mesh.complete(call)
        if isinstance(reply, str):
            answer.judge_error = reply
            return
        check_arm(reply, experiment, types_pb2.ARM_CONTROL)
        answer.judge_reply = reply.content
        answer.judge_cost_nano_usd = reply.cost_nano_usd
        answer.grade = parse_grade(reply.content)


def check_arm(
    reply: inference_pb2.CompleteResponse, experiment: str, arm: types_pb2.Arm.ValueType
) -> None:
    """A mesh that ignores the arm would compare a policy with itself and always pass."""
    if reply.experiment != experiment or reply.arm != arm:
        said = types_pb2.Arm.Name(reply.arm)
        raise EvalAbortError(
            f"the mesh answered a {ARM_NAMES[arm]} request as {said} of experiment "
            f"{reply.experiment!r}: it does not run experiment arms"
        )


async def gather_or_cancel(calls: Iterable[Awaitable[T]], progress: Tick) -> list[T]:
    """All results in order; the first error cancels the calls still running."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    done = 0

    def tick(_: asyncio.Future[T]) -> None:
        nonlocal done
        done += 1
        progress(done, len(tasks))

    for task in tasks:
        task.add_done_callback(tick)
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
