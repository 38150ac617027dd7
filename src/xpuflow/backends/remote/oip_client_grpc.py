"""The gRPC form of the Open Inference Protocol client (``inference.GRPCInferenceService``, grpc.aio).

Same calls as ``oip_client.RestOIPClient``; tensors travel in ``raw_input_contents`` (the compact form
Triton and KServe both read), answers are read from raw or typed contents::

    client = GrpcOIPClient("127.0.0.1:8081", OIPTimeouts(total_s=30))
    out = await client.infer("iris", {"input-0": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})

One HTTP/2 channel per client multiplexes every call. A gRPC status becomes a ``RemoteError`` with the
server's message and the HTTP status that means the same (UNAVAILABLE 503, RESOURCE_EXHAUSTED 429,
DEADLINE_EXCEEDED 504, NOT_FOUND 404, INVALID_ARGUMENT 400, ...), so retries work as for REST.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xpuflow.backends.remote.oip_client import ModelMetadata, OIPTimeouts, TensorSpec
from xpuflow.backends.remote.oip_proto import messages, method_path
from xpuflow.backends.remote.oip_tensors import datatype_of, from_contents, from_raw, to_raw
from xpuflow.backends.remote.openai import is_retryable_status
from xpuflow.errors import ConfigError, RemoteError, SessionError

__all__ = ["GRPC_TO_HTTP", "GrpcOIPClient"]

#: gRPC status name -> the HTTP status with the same meaning (how errors are classified and retried).
GRPC_TO_HTTP: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

#: Tensors may be large; gRPC's default 4 MiB receive limit would refuse a modest batch.
_MAX_MESSAGE_BYTES = 256 << 20

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
)


def grpc_target(address: str) -> str:
    """``host:port`` from ``host:port``, ``grpc://host:port`` or ``dns:///host:port``."""
    return address[len("grpc://") :] if address.startswith("grpc://") else address


class GrpcOIPClient:
    """One OIP server over gRPC; ``metadata`` (e.g. ``authorization``) is sent with every call."""

    def __init__(
        self,
        address: str,
        timeouts: OIPTimeouts | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.address = grpc_target(address)
        self.timeouts = timeouts or OIPTimeouts()
        self._metadata = tuple((k.lower(), v) for k, v in (metadata or {}).items())
        self._call_metadata: Any = None  # grpc.aio.Metadata, built with the channel
        self._channel: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stubs: dict[str, Any] = {}
        self.closed = False

    def _stub(self, method: str) -> Any:
        stub = self._stubs.get(method)
        if stub is not None and self._loop is asyncio.get_running_loop():
            return stub  # close() empties _stubs, so a closed client never gets here
        if self.closed:
            raise SessionError(f"the OIP gRPC client of {self.address} is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is not loop:
            raise SessionError(
                f"the OIP gRPC client of {self.address} is bound to the event loop that first used it"
            )
        if self._channel is None:
            import grpc

            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            self._loop = loop
            # Built once: a plain tuple is converted into grpc.aio.Metadata on every call.
            self._call_metadata = grpc.aio.Metadata(*self._metadata) if self._metadata else None
        request_cls = getattr(messages, f"{method}Request")
        response_cls = getattr(messages, f"{method}Response")
        # Registered (as grpc's generated stubs register theirs): gRPC's core resolves the method once
        # per channel instead of by its path on every call.
        stub = self._channel.unary_unary(
            method_path(method),
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
            _registered_method=True,
        )
        self._stubs[method] = stub
        return stub

    def _error(self, method: str, exc: Exception) -> RemoteError:
        import grpc

        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            status = GRPC_TO_HTTP.get(name, 500)
            hint = "; is the server running?" if name == "UNAVAILABLE" else ""
            return RemoteError(
                f"{self.address} answered {name} to {method}: {exc.details() or name}{hint}",
                status=status,
                retryable=is_retryable_status(status),
            )
        if isinstance(exc, ConfigError):
            return RemoteError(f"{self.address} returned a malformed tensor to {method}: {exc}")
        return RemoteError(f"{method} to {self.address} failed: {type(exc).__name__}: {exc}", retryable=True)

    async def _call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return await self._stub(method)(
                request, timeout=timeout_s or self.timeouts.total_s, metadata=self._call_metadata
            )
        except SessionError:
            raise
        except Exception as exc:
            raise self._error(method, exc) from exc

    async def server_ready(self, timeout_s: float | None = None) -> bool:
        try:
            reply = await self._call(
                "ServerReady", messages.ServerReadyRequest(), timeout_s or self.timeouts.health_s
            )
        except Exception:
            return False
        return bool(reply.ready)

    async def model_ready(self, model: str, version: str = "", timeout_s: float | None = None) -> bool:
        try:
            reply = await self._call(
                "ModelReady",
                messages.ModelReadyRequest(name=model, version=version),
                timeout_s or self.timeouts.health_s,
            )
        except Exception:
            return False
        return bool(reply.ready)

    async def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        reply = await self._call("ModelMetadata", messages.ModelMetadataRequest(name=model, version=version))

        def specs(items: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items)

        return ModelMetadata(
            reply.name, reply.platform, tuple(reply.versions), specs(reply.inputs), specs(reply.outputs)
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
    ) -> dict[str, np.ndarray[Any, Any]]:
        request = messages.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        add_input, add_raw = request.inputs.add, request.raw_input_contents.append
        for name, array in inputs.items():
            add_input(name=name, datatype=datatype_of(array), shape=array.shape)
            add_raw(to_raw(array))
        if outputs:
            add_output = request.outputs.add
            for name in outputs:
                add_output(name=name)
        reply = await self._call("ModelInfer", request)
        try:
            return decode_infer_reply(reply)
        except ConfigError as exc:
            raise self._error("ModelInfer", exc) from exc

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stubs.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def decode_infer_reply(reply: Any) -> dict[str, np.ndarray[Any, Any]]:
    """The output tensors of a ``ModelInferResponse``, from raw or typed contents."""
    raw = reply.raw_output_contents
    raw_count = len(raw)
    result: dict[str, np.ndarray[Any, Any]] = {}
    for index, output in enumerate(reply.outputs):
        name = output.name
        if index < raw_count:
            result[name] = from_raw(output.datatype, list(output.shape), raw[index], name)
        else:
            result[name] = from_contents(output.datatype, list(output.shape), output.contents, name)
    return result
