"""A support domain none of the training data covers, through `Complete` at the defaults.

Starts `costmesh serve` (embedded defaults, simulated provider), asks each question
of bench/probes/saas-support.json once (a miss: stored), then each of its rewordings
and look-alikes with no_store, so that every answer comes from the questions alone.
A rewording should hit its question; a look-alike must never hit anything.

    .venv/bin/python bench/saas_probe.py
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import grpc
from cache_hit_latency import KEY, _start_mesh

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2

PROBE = Path(__file__).parent / "probes" / "saas-support.json"


def _request(text: str, store: bool) -> inference_pb2.CompleteRequest:
    return inference_pb2.CompleteRequest(
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        cache_control=inference_pb2.CacheControl(no_store=not store),
    )


async def _run() -> None:
    probe = json.loads(PROBE.read_text(encoding="utf-8"))["questions"]
    with tempfile.TemporaryDirectory() as data_dir:
        process, address = await _start_mesh(data_dir)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                entries = {}
                for item in probe:
                    await stub.Complete(_request(item["question"], True), metadata=KEY, timeout=30)
                    again = await stub.Complete(_request(item["question"], True), metadata=KEY)
                    entries[again.cache_entry_id] = item["question"]
                hits = missed = wrong = 0
                for item in probe:
                    for text in item["rewordings"]:
                        reply = await stub.Complete(_request(text, False), metadata=KEY)
                        right = (
                            reply.cached and entries.get(reply.cache_entry_id) == item["question"]
                        )
                        hits += right
                        missed += not reply.cached
                        wrong += reply.cached and not right
                        print(
                            f"{'HIT ' if right else 'miss' if not reply.cached else 'WRONG'} {text}"
                        )
                    for text in item["look_alikes"]:
                        reply = await stub.Complete(_request(text, False), metadata=KEY)
                        wrong += reply.cached
                        print(f"{'WRONG' if reply.cached else 'ok  '} {text}")
        finally:
            process.terminate()
            await process.wait()
    rewordings = sum(len(i["rewordings"]) for i in probe)
    look_alikes = sum(len(i["look_alikes"]) for i in probe)
    print(
        f"rewordings answered from their question: {hits} of {rewordings}; missed {missed}; "
        f"wrong answers (look-alikes or rewordings answered by another question): {wrong} "
        f"of {rewordings + look_alikes} asked"
    )


if __name__ == "__main__":
    asyncio.run(_run())
