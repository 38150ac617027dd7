"""wrk (Debian's ``wrk``) as an HTTP load client: a Lua script that POSTs one JSON body, a bounded run,
and its text report parsed into numbers.

    script = write_script(folder, body, {"authorization": "Bearer ..."})
    result = run_wrk(url, script, threads=2, connections=32, duration_s=10)
    result["rps"], result["latency_ms"]["50"], result["requests"], result["non_2xx"]
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

WRK_INSTALL = "install Debian's wrk (apt-get install wrk) or put wrk on PATH"

_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_PERCENTILE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+),", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s*([0-9.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def lua_string(text: str) -> str:
    """``text`` as a Lua string literal: the escapes JSON writes for quotes, backslashes and control
    characters are Lua's too (non-ASCII text stays as it is; Lua 5.1 has no ``\\u`` escape)."""
    return json.dumps(text, ensure_ascii=False)


def script_text(body: bytes, headers: dict[str, str]) -> str:
    """A wrk Lua script that sends every request as ``POST`` with ``body`` and ``headers``."""
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(body.decode())}"]
    lines += [f"wrk.headers[{lua_string(name)}] = {lua_string(value)}" for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def write_script(folder: Path, body: bytes, headers: dict[str, str]) -> Path:
    path = folder / "post.lua"
    path.write_text(script_text(body, headers))
    return path


def time_ms(text: str) -> float:
    """One of wrk's durations (``635.91us``, ``1.20ms``, ``2.00s``) in milliseconds."""
    match = _TIME.match(text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse(report: str) -> dict[str, Any]:
    """The figures in wrk's report (run with ``--latency``): ``rps``, ``requests``, ``elapsed_s``,
    ``latency_ms`` (percentile -> ms), ``non_2xx`` and ``socket_errors``. Raises ValueError when the
    report has no ``Requests/sec`` line (wrk failed)."""
    rps = _RPS.search(report)
    requests = _REQUESTS.search(report)
    if rps is None or requests is None:
        raise ValueError(f"no figures in wrk's output: {report[-500:]!r}")
    non_2xx = _NON_2XX.search(report)
    sockets = _SOCKET_ERRORS.search(report)
    names = ("connect", "read", "write", "timeout")
    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)),
        "elapsed_s": time_ms(requests.group(2)) / 1000.0,
        "latency_ms": {q: time_ms(t) for q, t in _PERCENTILE.findall(report)},
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": dict.fromkeys(names, 0)
        if sockets is None
        else dict(zip(names, map(int, sockets.groups()), strict=True)),
    }


def run_wrk(url: str, script: Path, *, threads: int, connections: int, duration_s: float) -> dict[str, Any]:
    """One bounded wrk run against ``url``; its parsed figures plus the command line."""
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError(f"wrk not found: {WRK_INSTALL}")
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--latency"]
    argv += ["--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=True)
    return {**parse(out.stdout), "argv": ["wrk", *argv[1:-3], "post.lua", url]}
