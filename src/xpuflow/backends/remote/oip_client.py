"""Clients of the Open Inference Protocol (KServe v2): the contract, and its REST form over aiohttp.

Both wire forms (``RestOIPClient`` here, ``oip_client_grpc.GrpcOIPClient``) answer the same five calls
with numpy arrays in and out, and raise ``RemoteError`` carrying the server's own message::

    client = RestOIPClient("http://127.0.0.1:8080", OIPTimeouts(total_s=30))
    if await client.server_ready() and await client.model_ready("iris"):
        meta = await client.model_metadata("iris")           # names, datatypes, shapes
        out = await client.infer("iris", {"input-0": np.array([[5.1, 3.5, 1.4, 0.2]])})
    await client.close()

One pooled connection set per client, created in the event loop that first uses it; a cancelled call
closes its request on the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

from xpuflow.backends.remote.http_transport import transport_error
from xpuflow.backends.remote.oip_tensors import datatype_of, from_json, from_raw, to_json_data
from xpuflow.backends.remote.openai import is_retryable_status
from xpuflow.errors import ConfigError, RemoteError, SessionError

__all__ = [
    "ModelMetadata",
    "OIPClient",
    "OIPTimeouts",
    "RestOIPClient",
    "TensorSpec",
    "decode_infer_response",
    "metadata_from_json",
]

#: Header of Triton's binary tensor extension: the length of the JSON part of a body.
BINARY_HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output a model declares: name, OIP datatype, shape (-1 for any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelMetadata:
    """What a server says about a model (``GET /v2/models/{name}``, ``ModelMetadata``)."""

    name: str
    platform: str = ""
    versions: tuple[str, ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def _specs(items: Any) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            str(t.get("name", "")), str(t.get("datatype", "")), tuple(int(d) for d in t.get("shape", ()))
        )
        for t in items or ()
    )


def metadata_from_json(data: Mapping[str, Any]) -> ModelMetadata:
    """A ``ModelMetadata`` from the REST answer."""
    return ModelMetadata(
        name=str(data.get("name", "")),
        platform=str(data.get("platform", "")),
        versions=tuple(str(v) for v in data.get("versions") or ()),
        inputs=_specs(data.get("inputs")),
        outputs=_specs(data.get("outputs")),
    )


@dataclass(frozen=True)
class OIPTimeouts:
    """Seconds for one call (``total_s``), to open a connection, and for one health call."""

    total_s: float = 60.0
    connect_s: float = 2.0
    health_s: float = 1.0


class OIPClient(Protocol):
    """One OIP server. ``infer`` takes and returns tensors by name; errors are ``RemoteError``."""

    async def server_ready(self, timeout_s: float | None = None) -> bool:
        """Whether the server says it is ready (never raises; False on any failure)."""
        ...

    async def model_ready(self, model: str, version: str = "", timeout_s: float | None = None) -> bool:
        """Whether the server says ``model`` is ready (never raises)."""
        ...

    async def model_metadata(self, model: str, version: str = "") -> ModelMetadata: ...

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
    ) -> dict[str, np.ndarray[Any, Any]]: ...

    async def close(self) -> None: ...


@dataclass
class _Pool:
    """The aiohttp session of a client, bound to the loop that created it."""

    session: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "(empty body)"
    if isinstance(data, Mapping):
        error = data.get("error") or data.get("detail") or data.get("message")
        if isinstance(error, Mapping):
            error = error.get("message") or json.dumps(error)
        if error:
            return str(error)[:500]
    return body.strip()[:500]


class RestOIPClient:
    """The REST form: JSON tensors (and Triton's binary extension in answers), pooled connections."""

    def __init__(
        self,
        base_url: str,
        timeouts: OIPTimeouts | None = None,
        *,
        max_connections: int = 64,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or OIPTimeouts()
        self.max_connections = max_connections
        self._pool = _Pool(headers={"Accept": "application/json", **(headers or {})})
        self._infer_paths: dict[tuple[str, str], str] = {}  # (model, version) -> quoted path
        self.closed = False

    def _http(self) -> Any:
        if self.closed:
            raise SessionError(f"the OIP client of {self.base_url} is closed; create a new one")
        loop = asyncio.get_running_loop()
        pool = self._pool
        if pool.session is not None and pool.loop is not loop:
            raise SessionError(
                f"the OIP client of {self.base_url} is bound to the event loop that first used it"
            )
        if pool.session is None:
            import aiohttp

            pool.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                cookie_jar=aiohttp.DummyCookieJar(),  # model servers set no cookies; skip the jar per call
                timeout=aiohttp.ClientTimeout(
                    total=self.timeouts.total_s, sock_connect=self.timeouts.connect_s
                ),
                headers=pool.headers,
            )
            pool.loop = loop
        return pool.session

    @staticmethod
    def _model_path(model: str, version: str) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        return path + f"/versions/{quote(version, safe='')}" if version else path

    def _status_error(self, method: str, path: str, status: int, body: str) -> RemoteError:
        hint = {
            401: "; check options api_key or api_key_env",
            403: "; check options api_key or api_key_env",
            404: "; check options base_url and model",
        }.get(status, "")
        return RemoteError(
            f"{self.base_url} answered {status} to {method} {path}: {_error_text(body)}{hint}",
            status=status,
            retryable=is_retryable_status(status),
        )

    def _transport_error(self, method: str, path: str, exc: Exception) -> RemoteError:
        return transport_error(
            f"{method} {self.base_url}{path}",
            exc,
            f"timeout_s {self.timeouts.total_s:g}, connect_timeout_s {self.timeouts.connect_s:g}",
        )

    async def _get_status(self, path: str, timeout_s: float | None) -> bool:
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(
                total=timeout_s or self.timeouts.health_s, sock_connect=self.timeouts.connect_s
            )
            async with self._http().get(self.base_url + path, timeout=timeout) as response:
                await response.read()
                return bool(response.status == 200)
        except Exception:
            return False

    async def server_ready(self, timeout_s: float | None = None) -> bool:
        return await self._get_status("/v2/health/ready", timeout_s)

    async def model_ready(self, model: str, version: str = "", timeout_s: float | None = None) -> bool:
        return await self._get_status(self._model_path(model, version) + "/ready", timeout_s)

    async def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        path = self._model_path(model, version)
        try:
            async with self._http().get(self.base_url + path) as response:
                text = await response.text()
                if response.status >= 400:
                    raise self._status_error("GET", path, response.status, text)
                return metadata_from_json(json.loads(text))
        except RemoteError:
            raise
        except Exception as exc:
            raise self._transport_error("GET", path, exc) from exc

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        outputs: Sequence[str] = (),
        version: str = "",
        request_id: str = "",
    ) -> dict[str, np.ndarray[Any, Any]]:
        body: dict[str, Any] = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype_of(array),
                    "data": to_json_data(array),
                }
                for name, array in inputs.items()
            ]
        }
        if outputs:
            body["outputs"] = [{"name": name} for name in outputs]
        if request_id:
            body["id"] = request_id
        path = self._infer_paths.get((model, version))
        if path is None:
            path = self._infer_paths[(model, version)] = self._model_path(model, version) + "/infer"
        try:
            import aiohttp

            # a payload that names its own content type: no per-request header dict to merge
            payload = aiohttp.BytesPayload(
                json.dumps(body, separators=(",", ":")).encode(), content_type="application/json"
            )
            async with self._http().post(self.base_url + path, data=payload) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise self._status_error("POST", path, response.status, raw.decode("utf-8", "replace"))
                header_length = response.headers.get(BINARY_HEADER)
                return decode_infer_response(raw, int(header_length) if header_length else None)
        except RemoteError:
            raise
        except ConfigError as exc:
            raise RemoteError(f"{self.base_url}{path} returned a malformed tensor: {exc}") from exc
        except Exception as exc:
            raise self._transport_error("POST", path, exc) from exc

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._pool.session is not None:
            await self._pool.session.close()
            self._pool.session = None


def decode_infer_response(body: bytes, json_length: int | None = None) -> dict[str, np.ndarray[Any, Any]]:
    """The output tensors of a REST infer answer, JSON or with binary parts (Triton's extension)."""
    header = json.loads(body[:json_length] if json_length is not None else body)
    binary = memoryview(body)[json_length:] if json_length is not None else memoryview(b"")
    offset = 0
    result: dict[str, np.ndarray[Any, Any]] = {}
    for output in header.get("outputs") or ():
        name = str(output.get("name", ""))
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            result[name] = from_raw(
                output["datatype"], output["shape"], bytes(binary[offset : offset + int(size)]), name
            )
            offset += int(size)
        else:
            result[name] = from_json(output["datatype"], output["shape"], output.get("data", []), name)
    return result
