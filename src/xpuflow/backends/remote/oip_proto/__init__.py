"""The Open Inference Protocol's gRPC messages (KServe ``grpc_predict_v2.proto``), in a private pool.

``grpc_predict_v2.proto`` is KServe's file as published; ``grpc_predict_v2.pb`` is its compiled
descriptor set. The message classes are built from that descriptor in a ``DescriptorPool`` of their own
instead of generated ``_pb2`` modules, because every OIP implementation declares the same package
(``inference``): Triton's client (``tritonclient.grpc``), MLServer and KServe all register
``inference.ModelInferRequest`` in protobuf's default pool, and two registrations of one name in a process
fail. A private pool also carries no gencode version, so it loads under protobuf 5, 6 and 7 alike.
Only the names on the wire matter (``/inference.GRPCInferenceService/ModelInfer``, field numbers), so
clients and servers built from other copies of the file interoperate::

    from xpuflow.backends.remote.oip_proto import messages, method_path
    request = messages.ModelInferRequest(model_name="iris")
    path = method_path("ModelInfer")       # "/inference.GRPCInferenceService/ModelInfer"

Regenerate the descriptor after replacing the ``.proto`` (grpcio-tools, run in this folder)::

    python -m grpc_tools.protoc -I. --descriptor_set_out=grpc_predict_v2.pb grpc_predict_v2.proto
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from types import SimpleNamespace
from typing import Any

__all__ = ["METHODS", "SERVICE", "message_class", "messages", "method_path"]

SERVICE = "inference.GRPCInferenceService"

#: method -> (request message, response message), the RPCs xpuflow speaks.
METHODS: dict[str, tuple[str, str]] = {
    name: (f"{name}Request", f"{name}Response")
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
}

_MESSAGES = (
    *(m for pair in METHODS.values() for m in pair),
    "InferParameter",
    "InferTensorContents",
)


def method_path(method: str) -> str:
    """The HTTP/2 path of an RPC, e.g. ``/inference.GRPCInferenceService/ModelInfer``."""
    return f"/{SERVICE}/{method}"


@cache
def _pool() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool

    data = files(__name__).joinpath("grpc_predict_v2.pb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(proto)
    return pool


@cache
def message_class(name: str) -> Any:
    """The class of ``inference.<name>`` (nested names with dots: ``ModelInferRequest.InferInputTensor``)."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"inference.{name}"))


class _Messages(SimpleNamespace):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        cls = message_class(name)
        setattr(self, name, cls)
        return cls


messages: Any = _Messages()
"""Message classes by name, loaded on first use: ``messages.ModelInferRequest``."""
