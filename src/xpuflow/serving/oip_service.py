"""xpuflow as an Open Inference Protocol (KServe v2) server: what the REST and gRPC forms share.

Both forms (``serving.oip_rest``, ``serving.oip_grpc``) decode their wire format into arrays, then call
this service, which checks the key, turns the tensors into an ``InferenceCall`` and runs it through the
engine exactly as the OpenAI endpoints do (same routing, queues, QoS, retries and metrics)::

    service = OIPService(app.state.gateway)
    info = OIPRequestInfo(authorization=b"Bearer sk-...")
    outputs, decision = await service.infer("minilm", {"text": texts}, info)

Models. Embedding models take one BYTES input (one text per element, shape ``[n]`` or ``[n, 1]``) and
answer the FP32 output ``embedding`` of shape ``[n, dim]``. Tensor models take their inputs by name (an
engine that knows a model's metadata, such as a ``kserve_v2`` deployment's, reports it) and answer every
output. Chat models are not served over OIP: their clients use ``/v1/chat/completions``.

Errors are ``OIPError``: the HTTP status and the message (``to_api_error``'s mapping of engine errors);
the gRPC form turns the status into a gRPC code (``grpc_code``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xpuflow.backends.remote.oip_client import ModelMetadata, TensorSpec
from xpuflow.engine import InferenceCall, ModelInfo
from xpuflow.errors import XpuflowError
from xpuflow.serving.inference import to_api_error
from xpuflow.serving.openai_schema import APIError
from xpuflow.types import Priority, RequestKind, RoutingDecision

__all__ = ["EMBEDDING_OUTPUT", "OIPError", "OIPRequestInfo", "OIPService", "grpc_code"]

EMBEDDING_INPUT = "text"
EMBEDDING_OUTPUT = "embedding"
SERVED_TASKS = ("embedding", "tensor")

#: HTTP status -> gRPC status name (the inverse of the client's mapping, for the codes xpuflow answers).
_GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_code(status: int) -> str:
    """The gRPC status name for an HTTP status (INTERNAL for anything unlisted)."""
    return _GRPC_CODES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


class OIPError(Exception):
    """An answer that is an error: HTTP ``status`` and ``message`` (and headers such as Retry-After)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class OIPRequestInfo:
    """What a request says besides its tensors: its key and the xpuflow hints (headers or metadata)."""

    authorization: bytes | None = None
    priority: str | None = None
    qos_class: str | None = None
    request_id: str = ""


def _as_oip_error(exc: BaseException, models: Any = ()) -> OIPError:
    if isinstance(exc, OIPError):
        return exc
    error = exc if isinstance(exc, APIError) else to_api_error(exc, list(models))
    return OIPError(error.status, error.message, error.headers)


class OIPService:
    """The OIP operations over a ``Gateway`` (its engine, key check, metrics and model catalog)."""

    def __init__(self, gateway: Any, *, server_name: str = "xpuflow") -> None:
        from xpuflow import __version__

        self.gateway = gateway
        self.engine = gateway.engine
        self.server_name = server_name
        self.version = __version__
        self._metadata: dict[str, ModelMetadata] = {}

    # -- health and metadata ------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    async def ready(self) -> bool:
        """Ready when the engine is and the server is not draining."""
        if self.gateway.drain.draining:
            return False
        is_ready = getattr(self.engine, "is_ready", None)
        if not callable(is_ready):
            return True
        try:
            answer = is_ready()
            return bool(await answer if inspect.isawaitable(answer) else answer)
        except Exception:
            return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_name, "version": self.version, "extensions": ["binary_tensor_data"]}

    def check_key(self, authorization: bytes | None, right: str = "infer") -> Any:
        """The caller's key; OIPError 401/403 otherwise."""
        try:
            return self.gateway.auth.check(authorization, right)
        except APIError as exc:
            raise OIPError(exc.status, exc.message) from exc

    def model(self, name: str, version: str = "") -> ModelInfo:
        """A model served over OIP; OIPError 404 for an unknown one or a chat model."""
        catalog = self.gateway.catalog
        try:
            info: ModelInfo = catalog.get(name)
        except APIError as exc:
            raise OIPError(404, exc.message) from exc
        if info.task not in SERVED_TASKS:
            raise OIPError(
                404,
                f"model '{name}' is a {info.task} model; the Open Inference Protocol serves embedding and "
                "tensor models here: use POST /v1/chat/completions for it",
            )
        if version not in ("", "1"):
            raise OIPError(404, f"model '{name}' has no version '{version}'; its versions: 1")
        return info

    async def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.model(name, version)
        except OIPError:
            return False
        return await self.ready()

    async def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        info = self.model(name, version)
        cached = self._metadata.get(name)
        if cached is not None:
            return cached
        if info.task == "embedding":
            meta = ModelMetadata(
                name,
                "xpuflow_embedding",
                ("1",),
                (TensorSpec(EMBEDDING_INPUT, "BYTES", (-1,)),),
                (TensorSpec(EMBEDDING_OUTPUT, "FP32", (-1, -1)),),
            )
        else:
            meta = await self._tensor_metadata(name)
        self._metadata[name] = meta
        return meta

    async def _tensor_metadata(self, name: str) -> ModelMetadata:
        ask = getattr(self.engine, "tensor_metadata", None)
        if callable(ask):
            try:
                found = await ask(name)
            except XpuflowError as exc:
                raise _as_oip_error(exc, self.gateway.catalog.models) from exc
            if found is not None:
                return ModelMetadata(
                    name, found.platform or "xpuflow_tensor", ("1",), found.inputs, found.outputs
                )
        return ModelMetadata(name, "xpuflow_tensor", ("1",))

    # -- inference ----------------------------------------------------------------------------------

    def _call(
        self, info: ModelInfo, inputs: Mapping[str, np.ndarray[Any, Any]], request: OIPRequestInfo, key: Any
    ) -> InferenceCall:
        if info.task == "embedding":
            if len(inputs) != 1:
                raise OIPError(
                    400,
                    f"model '{info.name}' takes one BYTES input ('{EMBEDDING_INPUT}'), one text per element; "
                    f"got {len(inputs)} inputs",
                )
            ((name, array),) = inputs.items()
            if array.dtype.kind != "O":
                raise OIPError(
                    400, f"input '{name}' of model '{info.name}' must be BYTES (texts), got {array.dtype}"
                )
            if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1):
                raise OIPError(400, f"input '{name}' must have shape [n] or [n, 1], got {list(array.shape)}")
            try:
                texts = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
            except UnicodeDecodeError as exc:
                raise OIPError(400, f"input '{name}' holds bytes that are not UTF-8 text: {exc}") from exc
            if not texts:
                raise OIPError(400, f"input '{name}' holds no text; send at least one")
            kind: RequestKind = RequestKind.EMBEDDING
            payload: Any = texts
        else:
            kind, payload = RequestKind.TENSOR, dict(inputs)
        try:
            priority = Priority.parse(request.priority)
        except XpuflowError as exc:
            raise OIPError(400, str(exc)) from exc
        qos_class = key.qos_class if key is not None and key.qos_class is not None else request.qos_class
        settings = self.gateway.settings
        call = InferenceCall(
            model=info.name,
            kind=kind,
            payload=payload,
            priority=priority,
            qos_class=qos_class,
            api_key_name=key.name if key else None,
            timeout_s=settings.request_timeout_s,
        )
        if request.request_id:
            call.request_id = request.request_id
        return call

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        request: OIPRequestInfo,
        *,
        version: str = "",
    ) -> tuple[dict[str, np.ndarray[Any, Any]], RoutingDecision]:
        """Run one inference through the engine; outputs by name and where it ran. OIPError otherwise
        (recorded in the gateway's metrics either way)."""
        start = time.perf_counter()
        metrics = self.gateway.metrics
        labels = (model, "", "")
        metrics.in_flight += 1
        try:
            key = self.check_key(request.authorization)
            info = self.model(model, version)
            if self.gateway.drain.draining:
                raise OIPError(
                    503, "the server is shutting down; retry on another replica", {"retry-after": "1"}
                )
            call = self._call(info, inputs, request, key)
            try:
                result = await self.engine.complete(call)
            except BaseException:
                call.cancelled.set()  # nobody waits for it any more: a queued request is dropped
                raise
            decision = result.decision
            labels = (model, decision.tier or "", decision.device or "")
            if info.task == "embedding":
                vectors = np.asarray(result.embeddings or [], dtype=np.float32)
                outputs = {EMBEDDING_OUTPUT: vectors.reshape(len(call.payload), -1)}
            else:
                outputs = {str(k): np.asarray(v) for k, v in (getattr(result, "outputs", None) or {}).items()}
            metrics.observe_decision(model, decision)
            metrics.observe_request(
                *labels, 200, time.perf_counter() - start, queue_s=result.queue_ms / 1000.0
            )
            return outputs, decision
        except BaseException as exc:
            if isinstance(exc, Exception):
                error = _as_oip_error(exc, self.gateway.catalog.models)
                metrics.observe_request(*labels, error.status, time.perf_counter() - start)
                raise error from exc
            metrics.observe_request(*labels, 499, time.perf_counter() - start)
            raise
        finally:
            metrics.in_flight -= 1
