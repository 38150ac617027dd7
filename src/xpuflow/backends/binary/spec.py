"""The spec file of a binary-only vendor stack: how to run its compiler CLI and call its C runtime.

A vendor (or an integrator) describes the stack once, in YAML or JSON; xpuflow never guesses. The
spec is validated when it is loaded and every error names the field (``compiler.argv.0: ...``)::

    spec_version: 1
    name: refnpu
    device: {resource_type: npu, vendors: [xpuflow-refnpu], emulated_on_host: true, max_batch_size: 256}
    compiler:
      executable: refnpu-compile                  # relative paths resolve next to this file
      argv: ["{compiler}", "--input", "{model}", "--output", "{engine}", "--opt-level", "{opt_level}"]
      params: {opt_level: {type: int, default: 2, min: 0, max: 2}}
      outputs: [{name: engine, file: model.rnpu}]
      timeout_s: 300
      exit_codes: {3: "the input model is invalid"}
      version: {argv: ["{compiler}", "--version"], pattern: "refnpu-compile (\\\\S+)"}
    runtime:
      library: librefnpu_runtime.so
      engine_output: engine
      functions:
        - {name: refnpu_open, restype: int, argtypes: [int, void_pp]}
        ...
      roles: {open: refnpu_open, load: refnpu_load_engine, run: refnpu_run, ...}
      errors: {-5: {name: REFNPU_E_CHECKSUM, message: "engine checksum mismatch", hint: "rebuild it"}}

    spec_file = load_spec("refnpu.spec.yaml")
    spec_file.spec.compiler.timeout_s       # 300.0
    spec_file.executable()                  # absolute Path of the compiler, or None if missing

See docs/binary_backends.md for the full reference and the safety rules of the argv template.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xpuflow.errors import ConfigError

__all__ = [
    "BUILTIN_PLACEHOLDERS",
    "ROLE_SIGNATURES",
    "BinarySpec",
    "CType",
    "CompilerSpec",
    "DeviceSpec",
    "ErrorSpec",
    "FunctionSpec",
    "OutputSpec",
    "ParamSpec",
    "RolesSpec",
    "RuntimeSpec",
    "SpecFile",
    "VersionSpec",
    "load_spec",
    "parse_spec",
    "placeholders_in",
]

#: ``{name}`` in an argv element; names are identifiers.
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Placeholders every compiler template may use: the executable, the input model, the build folder.
BUILTIN_PLACEHOLDERS = frozenset({"compiler", "model", "out_dir"})

CType = Literal[
    "void", "int", "uint", "int64", "size_t", "float", "double",
    "char_p", "void_p", "void_pp", "float_p", "int_p",
]  # fmt: skip

#: The C signature xpuflow calls for each role: (restype, argtypes). A stack whose API differs ships
#: a thin C shim with these shapes; the spec checks the declared signatures against them.
ROLE_SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "open": ("int", ("int", "void_pp")),
    "load": ("int", ("void_p", "char_p", "void_pp")),
    "run": ("int", ("void_p", "float_p", "int", "int", "float_p", "int")),
    "last_error": ("char_p", ()),
    "unload": ("int", ("void_p",)),
    "close": ("int", ("void_p",)),
    "version": ("char_p", ()),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def placeholders_in(element: str) -> list[str]:
    """The placeholder names used in one argv element. Raises ValueError on stray braces."""
    names = PLACEHOLDER_RE.findall(element)
    if "{" in PLACEHOLDER_RE.sub("", element) or "}" in PLACEHOLDER_RE.sub("", element):
        raise ValueError(f"'{element}' has a brace that is not part of a {{name}} placeholder")
    return names


class ParamSpec(_Strict):
    """A compile option the deployment may set (``options.compile.<name>``), typed and bounded."""

    type: Literal["int", "str", "choice", "path"] = Field(
        description="int (bounded by min/max), str (matching pattern), choice (one of choices), or "
        "path (an existing file inside the allowed folders)."
    )
    default: int | str | None = Field(None, description="Value when the deployment sets none.")
    min: int | None = Field(None, description="Smallest int allowed.")
    max: int | None = Field(None, description="Largest int allowed.")
    choices: list[str] | None = Field(None, description="Allowed values of a choice.")
    pattern: str | None = Field(None, description="Regular expression a str must match in full.")
    description: str = Field("", description="What the option does, shown in errors.")

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "choice" and not self.choices:
            raise ValueError("a choice needs a non-empty 'choices' list")
        if self.type != "choice" and self.choices is not None:
            raise ValueError("'choices' only applies to type choice")
        if self.type != "int" and (self.min is not None or self.max is not None):
            raise ValueError("'min'/'max' only apply to type int")
        if self.pattern is not None:
            if self.type != "str":
                raise ValueError("'pattern' only applies to type str")
            re.compile(self.pattern)
        return self


class OutputSpec(_Strict):
    """A file the compiler writes into the build folder; ``{name}`` in argv is its full path."""

    name: str = Field(description="Placeholder name, e.g. 'engine'.")
    file: str = Field(description="Plain file name inside the build folder, e.g. 'model.rnpu'.")
    required: bool = Field(True, description="A missing or empty required output fails the build.")

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER_RE.fullmatch(value):
            raise ValueError(f"'{value}' is not an identifier (letters, digits, _)")
        return value

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise ValueError(f"'{value}' must be a plain file name without folders")
        return value


class VersionSpec(_Strict):
    """How to ask the compiler its version (part of every artifact's cache key)."""

    argv: list[str] = Field(default_factory=lambda: ["{compiler}", "--version"], min_length=1)
    pattern: str = Field(
        default=r"(\d+(?:\.\d+)+\S*)",
        description="Regex over stdout+stderr; group 1 (or the match) is the version.",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Seconds before the version command is killed.")

    @field_validator("argv")
    @classmethod
    def _only_compiler(cls, value: list[str]) -> list[str]:
        if value[0] != "{compiler}":
            raise ValueError("must start with '{compiler}'")
        for element in value:
            extra = set(placeholders_in(element)) - {"compiler"}
            if extra:
                raise ValueError(f"only {{compiler}} may appear here, found {sorted(extra)}")
        return value

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        re.compile(value)
        return value


class CompilerSpec(_Strict):
    """The compiler CLI: its executable, argv template, options, environment, limits and outputs."""

    executable: str = Field(description="Absolute path, path relative to the spec file, or a name on PATH.")
    name: str | None = Field(None, description="Name in build profiles; default: the executable's name.")
    argv: list[str] = Field(min_length=1, description="Argument list template; starts with '{compiler}'.")
    params: dict[str, ParamSpec] = Field(default_factory=dict, description="Typed compile options.")
    outputs: list[OutputSpec] = Field(min_length=1, description="Files the compiler must write.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables to set.")
    inherit_env: list[str] = Field(
        default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"],
        description="Variables copied from xpuflow's environment; nothing else is passed through.",
    )
    timeout_s: float = Field(
        600.0, gt=0, description="Seconds before the compiler's process group is killed."
    )
    exit_codes: dict[int, str] = Field(default_factory=dict, description="Exit status -> meaning.")
    version: VersionSpec = Field(default_factory=VersionSpec, description="The version command.")

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for name in value:
            if not _IDENTIFIER_RE.fullmatch(name):
                raise ValueError(f"param name '{name}' is not an identifier")
            if name in BUILTIN_PLACEHOLDERS:
                raise ValueError(f"param name '{name}' is reserved (built-in placeholder)")
        return value

    @model_validator(mode="after")
    def _template(self) -> CompilerSpec:
        if self.argv[0] != "{compiler}":
            raise ValueError("argv must start with '{compiler}' so only the declared executable runs")
        output_names = [o.name for o in self.outputs]
        if len(set(output_names)) != len(output_names):
            raise ValueError(f"output names must be unique, got {output_names}")
        clash = (set(output_names) & set(self.params)) | (set(output_names) & BUILTIN_PLACEHOLDERS)
        if clash:
            raise ValueError(f"output names {sorted(clash)} clash with params or built-in placeholders")
        known = BUILTIN_PLACEHOLDERS | set(self.params) | set(output_names)
        for index, element in enumerate(self.argv):
            try:
                names = placeholders_in(element)
            except ValueError as exc:
                raise ValueError(f"argv[{index}]: {exc}") from None
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(
                    f"argv[{index}] uses undeclared placeholder(s) {unknown}; declared: {sorted(known)}"
                )
        return self

    @property
    def display_name(self) -> str:
        return self.name or Path(self.executable).name


class FunctionSpec(_Strict):
    """One C function of the runtime library."""

    name: str = Field(description="The exported symbol.")
    restype: CType = Field(description="Return type.")
    argtypes: list[CType] = Field(default_factory=list, description="Argument types in order.")

    @field_validator("name")
    @classmethod
    def _symbol(cls, value: str) -> str:
        if not _IDENTIFIER_RE.fullmatch(value):
            raise ValueError(f"'{value}' is not a C identifier")
        return value

    @field_validator("argtypes")
    @classmethod
    def _no_void_args(cls, value: list[str]) -> list[str]:
        if "void" in value:
            raise ValueError("'void' is not an argument type; use [] for no arguments")
        return value


class ErrorSpec(_Strict):
    """What one runtime error code means."""

    name: str = Field(description="Symbolic name, e.g. REFNPU_E_CHECKSUM.")
    message: str = Field("", description="What went wrong.")
    hint: str = Field("", description="What the user should do about it.")
    retryable: bool = Field(False, description="Whether the same call may succeed if tried again.")


class RolesSpec(_Strict):
    """Which declared function plays each part of the call sequence open -> load -> run -> unload -> close."""

    open: str
    load: str
    run: str
    last_error: str
    unload: str
    close: str
    version: str | None = None


class RuntimeSpec(_Strict):
    """The C runtime library: where it is, its functions, which does what, and its error codes."""

    library: str = Field(description="Absolute path, path relative to the spec file, or a name for dlopen.")
    engine_output: str = Field(description="Name of the compiler output the runtime loads.")
    functions: list[FunctionSpec] = Field(min_length=1)
    roles: RolesSpec
    errors: dict[int, ErrorSpec] = Field(default_factory=dict, description="Return code -> meaning.")

    @field_validator("errors")
    @classmethod
    def _no_zero(cls, value: dict[int, ErrorSpec]) -> dict[int, ErrorSpec]:
        if 0 in value:
            raise ValueError("code 0 means success and cannot be an error")
        return value

    @model_validator(mode="after")
    def _roles_match(self) -> RuntimeSpec:
        by_name = {f.name: f for f in self.functions}
        if len(by_name) != len(self.functions):
            raise ValueError("function names must be unique")
        for role, symbol in self.roles.model_dump().items():
            if symbol is None:
                continue
            if symbol not in by_name:
                raise ValueError(f"roles.{role} names '{symbol}', which is not in functions")
            want_res, want_args = ROLE_SIGNATURES[role]
            fn = by_name[symbol]
            if fn.restype != want_res or tuple(fn.argtypes) != want_args:
                raise ValueError(
                    f"roles.{role}: {symbol} is declared ({fn.restype}, {fn.argtypes}) but the {role} "
                    f"role needs ({want_res}, {list(want_args)})"
                )
        return self

    def function(self, role: str) -> FunctionSpec | None:
        symbol = getattr(self.roles, role)
        return next((f for f in self.functions if f.name == symbol), None)


class DeviceSpec(_Strict):
    """Which resources the stack drives and what it can do there."""

    resource_type: Literal["npu", "gpu", "igpu", "pim", "cpu"] = "npu"
    vendors: list[str] = Field(
        default_factory=list, description="Resource vendor names it drives; empty: any of resource_type."
    )
    emulated_on_host: bool = Field(default=False, description="The 'device' is emulated on the host CPU.")
    max_batch_size: int = Field(default=64, ge=1, description="Largest batch one run call takes.")
    optimized_for: Literal["throughput", "latency", "energy"] = "latency"


class BinarySpec(_Strict):
    """The whole spec file."""

    spec_version: Literal[1] = 1
    name: str = Field(min_length=1, description="Stack name, e.g. 'refnpu'.")
    description: str = ""
    device: DeviceSpec = Field(default_factory=DeviceSpec)
    compiler: CompilerSpec
    runtime: RuntimeSpec

    @model_validator(mode="after")
    def _engine_output_declared(self) -> BinarySpec:
        names = [o.name for o in self.compiler.outputs]
        if self.runtime.engine_output not in names:
            raise ValueError(f"runtime.engine_output '{self.runtime.engine_output}' is not in {names}")
        return self


@dataclass(frozen=True)
class SpecFile:
    """A validated spec with where it came from; relative paths in it resolve against ``base_dir``."""

    spec: BinarySpec
    path: Path
    sha256: str

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def executable(self) -> Path | None:
        """The compiler's absolute path, or None if it is not there (or not on PATH for a bare name)."""
        return _resolve(self.spec.compiler.executable, self.base_dir, search_path=True)

    def library(self) -> str:
        """The library to dlopen: a resolved path when it is next to the spec, else the name as given."""
        found = _resolve(self.spec.runtime.library, self.base_dir, search_path=False)
        return str(found) if found is not None else self.spec.runtime.library


def _resolve(raw: str, base_dir: Path, *, search_path: bool) -> Path | None:
    path = Path(os.path.expanduser(raw))
    if path.is_absolute():
        return path if path.exists() else None
    candidate = base_dir / path
    if candidate.exists():
        return candidate.resolve()
    if search_path and len(path.parts) == 1:
        found = shutil.which(raw)
        return Path(found).resolve() if found else None
    return None


def _format_errors(exc: ValidationError, source: str) -> tuple[str, str]:
    lines = [f"invalid binary spec {source}:"]
    first = ""
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        first = first or where
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines), first


def parse_spec(data: Any, source: str = "<data>") -> BinarySpec:
    """Validate already-parsed spec data. Raises ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"binary spec {source} must be a mapping at the top level", field="spec")
    try:
        return BinarySpec.model_validate(data)
    except ValidationError as exc:
        message, first = _format_errors(exc, source)
        raise ConfigError(message, field=first) from exc


def load_spec(path: str | os.PathLike[str]) -> SpecFile:
    """Read and validate a YAML or JSON spec file (JSON is valid YAML)."""
    file = Path(path).expanduser().resolve()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read binary spec {file}: {exc.strerror or exc}; "
            "set options.spec to the vendor's spec file",
            field="spec",
        ) from exc
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"binary spec {file} is not valid YAML/JSON: {exc}", field="spec") from exc
    return SpecFile(parse_spec(data, str(file)), file, hashlib.sha256(raw).hexdigest())
