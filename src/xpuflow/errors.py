"""One exception tree for xpuflow.

Every error xpuflow raises is an ``XpuflowError``; vendor and library errors are mapped at the boundary
with ``raise ... from exc``. Messages say what to do next.

    XpuflowError
    ├── ConfigError            invalid user input or config (also a ValueError); names the field and the fix
    │   └── ModelNotFound          a request named a model that is not served (HTTP 404)
    ├── DiscoveryError         a probe could not run (probes record this instead of raising it)
    ├── CapabilityError        no device or backend can run the workload; carries the reasons
    ├── BackendError           a backend or its session failed
    │   ├── BackendUnavailable     the plugin's software stack is not installed or not usable here
    │   ├── SessionError           a running session failed a request
    │   │   └── WorkerLost             a worker on another node stopped answering (cluster)
    │   └── VendorRuntimeError     a vendor C runtime returned an error code
    ├── BuildError             building an artifact failed
    │   ├── CompilerError          a compiler exited non-zero (carries its stderr)
    │   ├── CompilerTimeout        a compiler ran past its timeout and was killed
    │   └── ArtifactCorrupt        an artifact failed its checksum and must not be used
    ├── RoutingError           no tier or worker could take the request
    │   └── DispatchError          every worker tried failed (``attempts``)
    │       └── DispatchTimeout        the deadline passed first (also a TimeoutError)
    ├── AdmissionRejected      a QoS context refused the request for now (retry_after_s)
    │   ├── QueueFull              a worker's queue has no room for its priority
    │   └── WorkerStopped          the worker is not running; send it elsewhere
    ├── RequestCancelled       the client went away before the answer
    ├── DeadlineExceeded       the request's deadline passed in a queue (also a TimeoutError)
    ├── AttemptTimeout         one attempt ran past the dispatcher's limit (retried elsewhere, never answered)
    ├── StreamInterrupted      a stream failed after its first chunk reached the client
    ├── ModelDoesNotFit        a model cannot be loaded: no room on its device even after evictions (HTTP 503)
    └── RemoteError            a remote server failed; ``retryable`` says whether another try may succeed
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AdmissionRejected",
    "ArtifactCorrupt",
    "AttemptTimeout",
    "BackendError",
    "BackendUnavailable",
    "BuildError",
    "CapabilityError",
    "CompilerError",
    "CompilerTimeout",
    "ConfigError",
    "DeadlineExceeded",
    "DiscoveryError",
    "DispatchError",
    "DispatchTimeout",
    "ModelDoesNotFit",
    "ModelNotFound",
    "QueueFull",
    "RemoteError",
    "RequestCancelled",
    "RoutingError",
    "SessionError",
    "StreamInterrupted",
    "VendorRuntimeError",
    "WorkerLost",
    "WorkerStopped",
    "XpuflowError",
]


class XpuflowError(Exception):
    """Base of every error xpuflow raises."""


class ConfigError(XpuflowError, ValueError):
    """Invalid user input or configuration. ``field`` names what to fix when it is known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFound(ConfigError):
    """A request named a model that is not served; ``available`` lists the ones that are."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"model '{model}' is not served here; available models: {names}", field="model")
        self.model = model
        self.available = tuple(sorted(available))


class DiscoveryError(XpuflowError):
    """A hardware probe could not run. Probes record it as a reason instead of raising it."""


class CapabilityError(XpuflowError):
    """No device or backend can run the workload; ``reasons`` lists why each candidate was refused."""

    def __init__(self, message: str, *, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reasons = tuple(reasons)


class BackendError(XpuflowError):
    """A backend or one of its sessions failed."""


class BackendUnavailable(BackendError):
    """The backend's software stack is not installed or not usable on this machine."""


class SessionError(BackendError):
    """A running session failed a request."""


class VendorRuntimeError(BackendError):
    """A vendor runtime library returned an error code; ``code`` is the raw value, ``name`` its symbolic
    name from the vendor's error table, ``retryable`` whether the same call may succeed again."""

    def __init__(
        self, message: str, *, code: int | None = None, name: str | None = None, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.retryable = retryable


class BuildError(XpuflowError):
    """Building an artifact failed."""


class CompilerError(BuildError):
    """A compiler exited with a non-zero status; ``stderr`` carries what it printed."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class CompilerTimeout(BuildError):
    """A compiler ran past its timeout and was killed with its process group."""


class ArtifactCorrupt(BuildError):
    """An artifact failed its checksum; it is never used and is rebuilt."""


class RoutingError(XpuflowError):
    """No tier or worker could take the request; ``reasons`` lists each rejection."""

    def __init__(self, message: str, *, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reasons = tuple(reasons)


class AdmissionRejected(XpuflowError):
    """A QoS context refused the request for now; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelDoesNotFit(XpuflowError):
    """A model cannot be made resident: its device lacks room even after evicting every model that may
    be evicted (pinned, in use and Guaranteed models stay). Room may free up: retry after
    ``retry_after_s``; ``reasons`` says what holds the memory."""

    def __init__(self, message: str, *, retry_after_s: float = 5.0, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reasons = tuple(reasons)


class RemoteError(XpuflowError):
    """A remote model server failed. ``retryable`` is true for connect errors, 429 and 5xx;
    ``retry_after_s`` is the server's ``Retry-After`` (429, 503), when it sent one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


# -- raised on the request path (scheduling, routing, cluster) --------------------------------------


class QueueFull(AdmissionRejected):
    """The worker's bounded queue has no room for this request's priority; retry after
    ``retry_after_s`` or on another worker."""


class RequestCancelled(XpuflowError):
    """The request was withdrawn (its client went away) before a result was delivered."""


class DeadlineExceeded(XpuflowError, TimeoutError):
    """The request's deadline passed before its result was ready. Also a ``TimeoutError``, so code
    that catches ``asyncio.TimeoutError`` sees it too."""


class AttemptTimeout(XpuflowError):
    """One attempt of a request ran past the dispatcher's time limit for an attempt: the dispatcher
    retries it elsewhere (or ends it with ``DispatchTimeout``); never answered to a client as is."""

    @classmethod
    def after(cls, limit_s: float) -> AttemptTimeout:
        """The error of an attempt given up at a limit of ``limit_s`` seconds."""
        return cls(f"no answer within {limit_s:g} s")


class WorkerStopped(AdmissionRejected):
    """The worker is not running (not started, stopping or stopped); send the request elsewhere."""


class DispatchError(RoutingError):
    """No worker served the request. ``attempts`` lists what was tried; ``reasons`` (from
    ``RoutingError``) has one line per failed attempt and per refused worker."""

    def __init__(self, message: str, *, reasons: Sequence[str] = (), attempts: Sequence[Any] = ()) -> None:
        super().__init__(message, reasons=reasons)
        self.attempts = tuple(attempts)


class DispatchTimeout(DispatchError, TimeoutError):
    """The request's ``deadline_s`` passed before any worker answered (a gateway answers 504). Also a
    ``TimeoutError``, like the queue's ``DeadlineExceeded``."""


class StreamInterrupted(XpuflowError):
    """A stream failed after its first chunk reached the client, so it could not be moved to another
    worker. The client holds a partial answer; ``chunks_delivered`` says how much. Retry the request."""

    def __init__(self, message: str, *, worker: str, tier: str, chunks_delivered: int) -> None:
        super().__init__(message)
        self.worker = worker
        self.tier = tier
        self.chunks_delivered = chunks_delivered


class WorkerLost(SessionError):
    """The worker's actor stopped answering (its node is gone or Ray is restarting it); retry elsewhere."""
