"""Call a vendor's C runtime library through ctypes, from the signatures declared in its spec.

Nothing about the library is guessed: each function gets the ``restype`` and ``argtypes`` the spec
declares (so ctypes converts and checks arguments), and the spec's ``roles`` say which function opens
the device, loads an engine, runs it, reports the last error, unloads and closes. Every non-zero
return code goes through the spec's error table into ``VendorRuntimeError(code=..., name=...,
retryable=...)`` with the library's own last-error text and the table's hint::

    with BinaryRuntimeAdapter(load_spec("refnpu.spec.yaml")).open(device_index=0) as runtime:
        engine = runtime.load_engine(Path("model.rnpu"))
        y = runtime.run(engine, x.astype(np.float32), out_dim=4)   # x: (batch, in_dim), C-contiguous

Not thread-safe by contract, like most vendor runtimes; a lock makes concurrent misuse wait instead of
corrupting state, and keeps each call and its last-error read on one thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpuflow.backends.binary.spec import FunctionSpec, SpecFile
from xpuflow.errors import BackendError, BackendUnavailable, ConfigError, VendorRuntimeError

__all__ = ["CTYPES", "BinaryRuntimeAdapter", "LoadedEngine"]

#: The spec's type vocabulary in ctypes terms.
CTYPES: dict[str, Any] = {
    "void": None,
    "int": ctypes.c_int,
    "uint": ctypes.c_uint,
    "int64": ctypes.c_int64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "char_p": ctypes.c_char_p,
    "void_p": ctypes.c_void_p,
    "void_pp": ctypes.POINTER(ctypes.c_void_p),
    "float_p": ctypes.POINTER(ctypes.c_float),
    "int_p": ctypes.POINTER(ctypes.c_int),
}

_INT32_MAX = 2**31 - 1


@dataclass(eq=False)
class LoadedEngine:
    """An engine loaded in the runtime. Valid until ``unload``/``close``; ``handle`` is the C pointer."""

    path: Path
    handle: ctypes.c_void_p
    loaded: bool = field(default=True)


class BinaryRuntimeAdapter:
    """One open device of a vendor runtime library, and the engines loaded on it."""

    def __init__(self, spec_file: SpecFile) -> None:
        self.spec_file = spec_file
        self.spec = spec_file.spec.runtime
        self._lib: ctypes.CDLL | None = None
        self._functions: dict[str, Callable[..., Any]] = {}
        self._device: ctypes.c_void_p | None = None
        self._engines: list[LoadedEngine] = []
        self._lock = threading.RLock()
        self.device_index: int | None = None

    # -- library -----------------------------------------------------------------------------------

    def _bind(self) -> None:
        if self._lib is not None:
            return
        library = self.spec_file.library()
        try:
            lib = ctypes.CDLL(library)
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot load runtime library '{library}' of spec {self.spec_file.path}: {exc}; install the "
                f"vendor runtime or fix runtime.library"
            ) from exc
        functions = {}
        for fn in self.spec.functions:
            functions[fn.name] = _declare(lib, fn, library)
        self._lib, self._functions = lib, functions

    def _call(self, role: str, *args: Any) -> Any:
        fn = self.spec.function(role)
        if fn is None:
            raise BackendError(f"the spec of {self.spec_file.spec.name} declares no '{role}' function")
        return self._functions[fn.name](*args)

    def last_error(self) -> str:
        """The library's message for the last failed call on this thread ("" when it has none)."""
        self._bind()
        raw = self._call("last_error")
        return raw.decode("utf-8", errors="replace") if raw else ""

    def version(self) -> str | None:
        """The library's version string, when the spec declares a version function."""
        self._bind()
        if self.spec.roles.version is None:
            return None
        raw = self._call("version")
        return raw.decode("utf-8", errors="replace") if raw else None

    def _check(self, rc: int, role: str) -> None:
        if rc == 0:
            return
        symbol = getattr(self.spec.roles, role)
        detail = self.last_error()
        entry = self.spec.errors.get(rc)
        if entry is None:
            message = f"{symbol} returned error code {rc}, which the spec's error table does not list"
            raise VendorRuntimeError(message + (f": {detail}" if detail else ""), code=rc)
        message = f"{symbol} failed with {entry.name} ({rc})"
        message += f": {entry.message}" if entry.message else ""
        message += f": {detail}" if detail else ""
        message += f"; {entry.hint}" if entry.hint else ""
        raise VendorRuntimeError(message, code=rc, name=entry.name, retryable=entry.retryable)

    # -- call sequence -----------------------------------------------------------------------------

    def open(self, device_index: int = 0) -> BinaryRuntimeAdapter:
        """Load the library and open device ``device_index``. Returns self, for ``with ... as``."""
        with self._lock:
            if self._device is not None:
                raise BackendError(f"runtime of {self.spec_file.spec.name} is already open")
            self._bind()
            handle = ctypes.c_void_p()
            self._check(self._call("open", device_index, ctypes.byref(handle)), "open")
            if not handle.value:
                raise VendorRuntimeError("open reported success but returned no device handle", code=0)
            self._device, self.device_index = handle, device_index
            return self

    def _require_open(self) -> ctypes.c_void_p:
        if self._device is None:
            raise BackendError(f"runtime of {self.spec_file.spec.name} is not open; call open() first")
        return self._device

    def load_engine(self, path: str | os.PathLike[str]) -> LoadedEngine:
        """Load an engine file; the library validates it (and maps what it rejects to an error)."""
        with self._lock:
            device = self._require_open()
            handle = ctypes.c_void_p()
            engine_path = Path(path)
            rc = self._call("load", device, os.fsencode(engine_path), ctypes.byref(handle))
            self._check(rc, "load")
            if not handle.value:
                raise VendorRuntimeError("load reported success but returned no engine handle", code=0)
            engine = LoadedEngine(engine_path, handle)
            self._engines.append(engine)
            return engine

    def run(self, engine: LoadedEngine, inputs: np.ndarray, out_dim: int) -> np.ndarray:
        """Run a batch: ``inputs`` is a C-contiguous float32 array (batch, in_dim); returns (batch, out_dim).

        The array is passed to C without a copy, which is why its layout is checked, not assumed.
        """
        if not isinstance(inputs, np.ndarray) or inputs.dtype != np.float32 or inputs.ndim != 2:
            raise ConfigError(
                "inputs must be a float32 numpy array of shape (batch, in_dim); "
                "use np.ascontiguousarray(x, dtype=np.float32)",
                field="inputs",
            )
        if not inputs.flags.c_contiguous:
            raise ConfigError(
                "inputs must be C-contiguous; use np.ascontiguousarray(x, dtype=np.float32)", field="inputs"
            )
        batch, in_dim = inputs.shape
        if not (1 <= batch <= _INT32_MAX and 1 <= out_dim <= _INT32_MAX and in_dim <= _INT32_MAX):
            raise ConfigError(
                f"batch {batch}, in_dim {in_dim} and out_dim {out_dim} must fit a C int", field="inputs"
            )
        output = np.empty((batch, out_dim), dtype=np.float32)
        float_p = CTYPES["float_p"]
        with self._lock:
            self._require_open()
            if not engine.loaded or engine not in self._engines:
                raise BackendError(f"engine {engine.path} is not loaded on this runtime")
            rc = self._call(
                "run",
                engine.handle,
                inputs.ctypes.data_as(float_p),
                batch,
                in_dim,
                output.ctypes.data_as(float_p),
                out_dim,
            )
            self._check(rc, "run")
        return output

    def unload(self, engine: LoadedEngine) -> None:
        with self._lock:
            if not engine.loaded:
                return
            self._require_open()
            engine.loaded = False
            if engine in self._engines:
                self._engines.remove(engine)
            self._check(self._call("unload", engine.handle), "unload")

    def close(self) -> None:
        """Unload every engine, then close the device. Idempotent; raises the first error after trying all."""
        with self._lock:
            if self._device is None:
                return
            first: VendorRuntimeError | None = None
            for engine in list(self._engines):
                try:
                    self.unload(engine)
                except VendorRuntimeError as exc:
                    first = first or exc
            device, self._device = self._device, None
            try:
                self._check(self._call("close", device), "close")
            except VendorRuntimeError as exc:
                first = first or exc
            if first is not None:
                raise first

    @property
    def is_open(self) -> bool:
        return self._device is not None

    def __enter__(self) -> BinaryRuntimeAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _declare(lib: ctypes.CDLL, fn: FunctionSpec, library: str) -> Callable[..., Any]:
    try:
        function = getattr(lib, fn.name)
    except AttributeError as exc:
        raise BackendUnavailable(
            f"runtime library '{library}' does not export '{fn.name}' declared by the spec; the spec and "
            f"the installed runtime do not match"
        ) from exc
    function.restype = CTYPES[fn.restype]
    function.argtypes = [CTYPES[t] for t in fn.argtypes]
    return function  # type: ignore[no-any-return]
