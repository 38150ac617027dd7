"""The Open Inference Protocol's gRPC form: ``inference.GRPCInferenceService`` beside the HTTP API.

``xpuflow serve`` starts it when ``gateway.grpc_port`` is set (0 picks a free port)::

    server = OIPGrpcServer(OIPService(app.state.gateway), "127.0.0.1", 8001)
    port = await server.start()
    ...
    await server.stop(grace_s=5)

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (the repository
RPCs answer UNIMPLEMENTED). Keys travel as metadata ``authorization: Bearer <key>``; ``x-priority`` and
``x-qos-class`` metadata work as the HTTP headers do. Inputs are read from ``raw_input_contents`` or
typed ``contents``; outputs go back in ``raw_output_contents`` (what Triton answers, and what
``tritonclient.grpc`` reads). Errors are gRPC statuses with the gateway's message: UNAUTHENTICATED,
PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED (429, with ``retry-after`` in the
trailing metadata), UNAVAILABLE, DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from xpuflow.backends.remote.oip_proto import SERVICE, messages
from xpuflow.backends.remote.oip_tensors import datatype_of, from_contents, from_raw, to_raw
from xpuflow.errors import ConfigError
from xpuflow.serving.oip_service import OIPError, OIPRequestInfo, OIPService, grpc_code

__all__ = ["OIPGrpcServer"]

log = logging.getLogger(__name__)

#: Largest message either way; gRPC's 4 MiB default would refuse a modest batch of tensors.
MAX_MESSAGE_BYTES = 64 << 20


def _request_info(context: Any, request_id: str) -> OIPRequestInfo:
    """The key and xpuflow hints of a call, in one pass over its metadata (HTTP/2 sends keys in lower
    case, and grpcio refuses others)."""
    authorization = priority = qos_class = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            authorization = value.encode("latin-1")
        elif key == "x-priority" and isinstance(value, str):
            priority = value
        elif key == "x-qos-class" and isinstance(value, str):
            qos_class = value
    return OIPRequestInfo(
        authorization=authorization, priority=priority, qos_class=qos_class, request_id=request_id
    )


def _inputs(request: Any) -> dict[str, np.ndarray[Any, Any]]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise OIPError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    try:
        for index, tensor in enumerate(request.inputs):
            shape = list(tensor.shape)
            if raw:
                inputs[tensor.name] = from_raw(tensor.datatype, shape, raw[index], tensor.name)
            else:
                inputs[tensor.name] = from_contents(tensor.datatype, shape, tensor.contents, tensor.name)
    except ConfigError as exc:
        raise OIPError(400, str(exc)) from exc
    if not inputs:
        raise OIPError(400, "the request has no inputs; send one tensor per model input")
    return inputs


class OIPGrpcServer:
    """A grpc.aio server for ``service``; one per gateway process."""

    def __init__(self, service: OIPService, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._server: Any = None

    def _handlers(self) -> dict[str, Any]:
        """RPC name -> method handler; registered with the server so gRPC's core matches each call's path
        once, instead of the generic handler's per-call lookup in Python."""
        import grpc

        def unary(method: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
            request_cls = getattr(messages, f"{method}Request")
            response_cls = getattr(messages, f"{method}Response")

            async def handle(request: Any, context: Any) -> Any:
                try:
                    return await fn(request, context)
                except OIPError as exc:
                    if exc.headers.get("retry-after"):
                        context.set_trailing_metadata((("retry-after", exc.headers["retry-after"]),))
                    await context.abort(grpc.StatusCode[grpc_code(exc.status)], exc.message)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
                        raise
                    log.error("gRPC %s failed", method, exc_info=exc)
                    await context.abort(
                        grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
                    )

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )

        return {
            "ServerLive": unary("ServerLive", self.server_live),
            "ServerReady": unary("ServerReady", self.server_ready),
            "ModelReady": unary("ModelReady", self.model_ready),
            "ServerMetadata": unary("ServerMetadata", self.server_metadata),
            "ModelMetadata": unary("ModelMetadata", self.model_metadata),
            "ModelInfer": unary("ModelInfer", self.model_infer),
        }

    # -- RPCs ---------------------------------------------------------------------------------------

    async def server_live(self, request: Any, context: Any) -> Any:
        return messages.ServerLiveResponse(live=self.service.live())

    async def server_ready(self, request: Any, context: Any) -> Any:
        return messages.ServerReadyResponse(ready=await self.service.ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        self.service.check_key(_authorization(context))
        return messages.ModelReadyResponse(
            ready=await self.service.model_ready(request.name, request.version)
        )

    async def server_metadata(self, request: Any, context: Any) -> Any:
        meta = self.service.server_metadata()
        return messages.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    async def model_metadata(self, request: Any, context: Any) -> Any:
        self.service.check_key(_authorization(context))
        meta = await self.service.model_metadata(request.name, request.version)
        reply = messages.ModelMetadataResponse(
            name=meta.name, versions=list(meta.versions), platform=meta.platform
        )
        for specs, target in ((meta.inputs, reply.inputs), (meta.outputs, reply.outputs)):
            for spec in specs:
                target.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return reply

    async def model_infer(self, request: Any, context: Any) -> Any:
        outputs, _decision = await self.service.infer(
            request.model_name,
            _inputs(request),
            _request_info(context, request.id),
            version=request.model_version,
        )
        wanted = [o.name for o in request.outputs] if request.outputs else outputs
        reply = messages.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        add_output, add_raw = reply.outputs.add, reply.raw_output_contents.append
        for name in wanted:
            array = outputs.get(name)
            if array is None:
                raise OIPError(400, f"unknown output '{name}'; outputs: {', '.join(outputs)}")
            add_output(name=name, datatype=datatype_of(array), shape=array.shape)
            add_raw(to_raw(array))
        return reply

    # -- lifetime -----------------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen and serve; returns the bound port. OSError when the address cannot be bound."""
        import grpc

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_registered_method_handlers(SERVICE, self._handlers())
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {address}; choose another gateway.grpc_port")
        await server.start()
        self._server = server
        self.port = int(bound)
        return self.port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting calls; calls in flight get ``grace_s`` seconds to finish."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


def _authorization(context: Any) -> bytes | None:
    return _request_info(context, "").authorization
