"""Server reflection under both names clients ask for.

grpcurl, Postman and current gRPC tools ask `grpc.reflection.v1` first; older ones
only `v1alpha`. grpcio-reflection implements v1alpha, and v1's messages are the same
messages on the wire (v1 renamed the package, not a field), so one servicer answers
under both names."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1 = "grpc.reflection.v1.ServerReflection"


def enable(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    servicer = ReflectionServicer([*service_names, reflection.SERVICE_NAME, V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )
