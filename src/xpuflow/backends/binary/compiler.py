"""Run a vendor's compiler CLI from the argv template in its spec, safely and with a deadline.

The template is a list, never a shell string, and the process runs with ``shell=False``, so a value
can never be read as shell syntax: ``my model; rm -rf ~.xpfmlp`` reaches the compiler as one
argument, verbatim. Placeholder values are checked before anything runs:

- only placeholders the spec declares (built-ins, ``params``, ``outputs``) may appear;
- paths are resolved (symlinks included) and must stay inside the allowed folders, so ``../`` cannot
  escape them;
- no value may start with ``-`` (it would be read as an option), be empty, or hold NUL or newlines;
- params are typed: ints within min/max, choices from their list, strs matching their pattern.

The compiler runs in its own session (process group) with only the environment the spec allows. At
its timeout the whole group is killed with SIGKILL and reaped, then ``CompilerTimeout`` is raised;
leftover children of a compiler that exited are killed too, so a build never leaves processes
behind. A non-zero exit raises ``CompilerError`` with the status's meaning and the trimmed stderr;
success still requires every required output to exist and be non-empty::

    compiler = BinaryCompilerAdapter(load_spec("refnpu.spec.yaml"))
    result = compiler.compile(model=Path("mlp.xpfmlp"), out_dir=build_dir, params={"opt_level": 1})
    result.outputs["engine"]      # build_dir / "model.rnpu"
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from xpuflow.backends.binary.spec import PLACEHOLDER_RE, ParamSpec, SpecFile
from xpuflow.errors import BackendUnavailable, BuildError, CompilerError, CompilerTimeout, ConfigError

__all__ = ["BinaryCompilerAdapter", "CompileResult", "trim_output"]

#: How much of a compiler's stderr an error carries: the head (the first error) and the tail (the last).
STDERR_HEAD_BYTES = 2048
STDERR_TAIL_BYTES = 6144
_POLL_MAX_S = 0.05


@dataclass(frozen=True)
class CompileResult:
    """A successful compiler run: the exact argv, the outputs it wrote, and how long it took."""

    argv: tuple[str, ...]
    outputs: Mapping[str, Path]
    returncode: int
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready build metadata for the artifact store."""
        return {
            "compiler_argv": list(self.argv),
            "compile_params": dict(self.params),
            "compile_duration_s": round(self.duration_s, 4),
            "outputs": {name: path.name for name, path in self.outputs.items()},
            "compiler_stderr": self.stderr,
        }


@dataclass(frozen=True)
class _Finished:
    returncode: int
    stdout: str
    stderr: str
    duration_s: float


def trim_output(data: bytes, head: int = STDERR_HEAD_BYTES, tail: int = STDERR_TAIL_BYTES) -> str:
    """Keep the first ``head`` and last ``tail`` bytes of a tool's output, decoded leniently."""
    if len(data) > head + tail:
        omitted = len(data) - head - tail
        data = data[:head] + f"\n... [{omitted} bytes omitted] ...\n".encode() + data[-tail:]
    return data.decode("utf-8", errors="replace")


def _read_back(stream: IO[bytes]) -> str:
    stream.seek(0)
    return trim_output(stream.read())


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, signal.SIGKILL)


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait until ``proc`` exits without reaping it; False on timeout.

    The exited leader stays a zombie, so its pid (which is also the process-group id) cannot be
    reused before we kill the rest of its group: killpg never hits an unrelated process.
    """
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # platforms without waitid: reaping first is the best available
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s
    interval = 0.001
    while True:
        if waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))
        interval = min(interval * 2, _POLL_MAX_S)


class BinaryCompilerAdapter:
    """Drives one vendor compiler CLI as declared by a spec. Thread-safe: it holds no run state."""

    def __init__(self, spec_file: SpecFile) -> None:
        self.spec_file = spec_file
        self.spec = spec_file.spec.compiler
        self._version: tuple[tuple[str, int, int], str] | None = None

    @property
    def name(self) -> str:
        return self.spec.display_name

    def executable(self) -> Path:
        """The compiler's absolute path. Raises BackendUnavailable naming where it was looked for."""
        found = self.spec_file.executable()
        if found is None or not os.access(found, os.X_OK):
            raise BackendUnavailable(
                f"compiler '{self.spec.executable}' of spec {self.spec_file.path} is not installed or not "
                f"executable (looked next to the spec and on PATH); install the vendor SDK or fix "
                f"compiler.executable"
            )
        return found

    def version(self) -> str:
        """The compiler's version from the spec's version command (cached per executable file)."""
        exe = self.executable()
        stat = exe.stat()
        key = (str(exe), stat.st_mtime_ns, stat.st_size)
        if self._version is not None and self._version[0] == key:
            return self._version[1]
        vspec = self.spec.version
        argv = [element.replace("{compiler}", str(exe)) for element in vspec.argv]
        try:
            done = self._run(argv, exe.parent, vspec.timeout_s, self._environment())
        except BuildError as exc:
            raise BackendUnavailable(f"cannot get the version of {self.name}: {exc}") from exc
        text = done.stdout + "\n" + done.stderr
        match = re.search(vspec.pattern, text)
        if done.returncode != 0 or match is None:
            raise BackendUnavailable(
                f"'{' '.join(argv)}' exited with status {done.returncode} and no version matching "
                f"{vspec.pattern!r}: {text.strip()[:300]!r}; fix compiler.version in the spec"
            )
        version = match.group(1) if match.groups() else match.group(0)
        self._version = (key, version)
        return version

    # -- placeholders ------------------------------------------------------------------------------

    def resolve_params(self, params: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Typed, bounded param values (defaults filled) as strings; path params are not resolved here.

        Raises ConfigError naming ``compile.<name>`` for an unknown name or a bad value.
        """
        given = dict(params or {})
        unknown = sorted(set(given) - set(self.spec.params))
        if unknown:
            raise ConfigError(
                f"unknown compile option(s) {unknown} for {self.name}; declared: {sorted(self.spec.params)}",
                field=f"compile.{unknown[0]}",
            )
        values: dict[str, str] = {}
        for name, pspec in self.spec.params.items():
            value = given.get(name, pspec.default)
            if value is None:
                continue
            values[name] = _check_param(name, pspec, value)
        return values

    def render_argv(
        self,
        model: Path,
        out_dir: Path,
        params: Mapping[str, Any] | None = None,
        allowed_dirs: Sequence[Path] | None = None,
    ) -> list[str]:
        """The exact argv the compiler will get. Validates every value (see the module docstring).

        ``allowed_dirs`` defaults to the model's folder; ``out_dir`` is always allowed. Relative path
        params resolve against the model's folder.
        """
        out_root = out_dir.resolve()
        model_path = model.expanduser().resolve()
        roots = [out_root, *(Path(d).resolve() for d in (allowed_dirs or [model_path.parent]))]
        if not model_path.is_file():
            raise ConfigError(f"model {model} does not exist or is not a file", field="model")
        _require_inside("model", model_path, roots)
        values: dict[str, str] = {"compiler": str(self.executable()), "model": str(model_path)}
        values["out_dir"] = str(out_root)
        for output in self.spec.outputs:
            target = out_root / output.file
            _require_inside(output.name, target, [out_root])
            values[output.name] = str(target)
        for name, given in self.resolve_params(params).items():
            if self.spec.params[name].type == "path":
                path = (model_path.parent / given).resolve()
                if not path.is_file():
                    raise ConfigError(
                        f"compile.{name}: {given} is not an existing file", field=f"compile.{name}"
                    )
                _require_inside(f"compile.{name}", path, roots)
                given = str(path)  # noqa: PLW2901 - the resolved path is what the compiler gets
            values[name] = given
        for name, value in values.items():
            _check_value(name, value)

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in values:
                raise ConfigError(
                    f"compile option '{name}' is used by {self.name}'s argv but has no value and no "
                    f"default; set options.compile.{name}",
                    field=f"compile.{name}",
                )
            return values[name]

        # One template element stays one argv element whatever the values hold.
        return [PLACEHOLDER_RE.sub(substitute, element) for element in self.spec.argv]

    # -- running -----------------------------------------------------------------------------------

    def _environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {name: os.environ[name] for name in self.spec.inherit_env if name in os.environ}
        env.update(self.spec.env)
        env.update(extra or {})
        return env

    def _run(self, argv: list[str], cwd: Path, timeout_s: float, env: Mapping[str, str]) -> _Finished:
        # Output goes to anonymous files, not pipes: a compiler's children that keep a pipe open
        # cannot block us, and a chatty compiler cannot fill a pipe and stall.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    env=dict(env),
                    shell=False,
                    close_fds=True,
                    start_new_session=True,
                )
            except (OSError, ValueError) as exc:
                raise BuildError(f"cannot start {argv[0]}: {exc}") from exc
            try:
                exited = _wait_unreaped(proc, timeout_s)
            finally:
                # Exited, timed out or interrupted: nothing of this build may keep running.
                _kill_group(proc.pid)
                proc.wait()
            duration_s = time.monotonic() - start
            if not exited:
                raise CompilerTimeout(
                    f"{Path(argv[0]).name} ran past its {timeout_s:g} s timeout and was killed with its "
                    f"process group; raise compiler.timeout_s in the spec if the model is that large. "
                    f"stderr so far: {_read_back(err).strip()[-500:]!r}"
                )
            return _Finished(proc.returncode, _read_back(out), _read_back(err), duration_s)

    def compile(
        self,
        model: Path,
        out_dir: Path,
        params: Mapping[str, Any] | None = None,
        *,
        allowed_dirs: Sequence[Path] | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> CompileResult:
        """Compile ``model`` into ``out_dir`` and check the declared outputs.

        Raises ConfigError (bad placeholder value), BackendUnavailable (no compiler), CompilerTimeout,
        or CompilerError (non-zero exit, or a required output missing or empty).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = self.render_argv(Path(model), out_dir, params, allowed_dirs)
        for output in self.spec.outputs:
            # A stale file from an earlier run must not pass the output check below.
            (out_dir / output.file).unlink(missing_ok=True)
        done = self._run(argv, out_dir, timeout_s or self.spec.timeout_s, self._environment(env))
        if done.returncode != 0:
            raise CompilerError(self._failure_message(done), returncode=done.returncode, stderr=done.stderr)
        outputs: dict[str, Path] = {}
        for output in self.spec.outputs:
            path = out_dir / output.file
            present = path.is_file() and not path.is_symlink()
            if present and path.stat().st_size > 0:
                outputs[output.name] = path
            elif output.required:
                problem = "an empty" if present else "no"
                raise CompilerError(
                    f"{self.name} exited 0 but wrote {problem} required output '{output.name}' "
                    f"({output.file}); check the spec's outputs against the compiler's arguments",
                    returncode=0,
                    stderr=done.stderr,
                )
        return CompileResult(
            argv=tuple(argv),
            outputs=outputs,
            returncode=0,
            duration_s=done.duration_s,
            stdout=done.stdout,
            stderr=done.stderr,
            params=self.resolve_params(params),
        )

    def _failure_message(self, done: _Finished) -> str:
        if done.returncode < 0:
            try:
                what = f"was killed by {signal.Signals(-done.returncode).name}"
            except ValueError:
                what = f"was killed by signal {-done.returncode}"
        else:
            meaning = self.spec.exit_codes.get(done.returncode)
            what = f"exited with status {done.returncode}" + (f" ({meaning})" if meaning else "")
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1].strip()[:500] if lines else "no message on stderr"
        return f"{self.name} {what}: {last}"


def _check_param(name: str, pspec: ParamSpec, value: Any) -> str:
    where = f"compile.{name}"
    hint = f" ({pspec.description})" if pspec.description else ""
    if pspec.type == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where} must be an integer{hint}, got {value!r}", field=where)
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer{hint}, got {value!r}", field=where) from None
        low = pspec.min if pspec.min is not None else number
        high = pspec.max if pspec.max is not None else number
        if not low <= number <= high:
            raise ConfigError(f"{where} must be in {pspec.min}..{pspec.max}{hint}, got {number}", field=where)
        return str(number)
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{where} must be a string{hint}, got {value!r}", field=where)
    text = os.fspath(value)
    if pspec.type == "choice" and text not in (pspec.choices or []):
        raise ConfigError(f"{where} must be one of {pspec.choices}{hint}, got {text!r}", field=where)
    if pspec.type == "str" and pspec.pattern is not None and not re.fullmatch(pspec.pattern, text):
        raise ConfigError(f"{where} must match {pspec.pattern!r}{hint}, got {text!r}", field=where)
    return str(text)


def _check_value(name: str, value: str) -> None:
    where = name if name in ("model", "compiler", "out_dir") else f"compile.{name}"
    if not value:
        raise ConfigError(f"{where} is empty; give it a value", field=where)
    if any(c in value for c in "\0\n\r"):
        raise ConfigError(
            f"{where} contains a NUL or newline character, which is never passed on", field=where
        )
    if value.startswith("-"):
        raise ConfigError(
            f"{where} value {value!r} starts with '-' and would be read as an option; refused", field=where
        )


def _require_inside(name: str, path: Path, roots: Sequence[Path]) -> None:
    resolved = path.resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise ConfigError(
            f"{name} resolves to {resolved}, outside the allowed folders {[str(r) for r in roots]}",
            field=name,
        )
