"""Encoder models as ONNX: the export build step, the layout it writes, and how that model is run.

The ``onnxruntime`` and ``openvino`` backends serve embeddings from a Hugging Face encoder (BERT,
MiniLM, ...) exported once to ONNX and kept in the artifact store. This module is the one place that
knows what the export writes and how the runtimes feed and read it::

    model.onnx        the encoder: int64 inputs named as the tokenizer names them (input_ids,
                      attention_mask[, token_type_ids]) with dynamic batch and sequence axes, and one
                      output, last_hidden_state [batch, sequence, hidden]
    tokenizer.json    the fast tokenizer, with the tokenizer's other files
    encoder.json      the ``EncoderSpec``: input and output names, max length, pooling, pad token

    info = export_encoder(minilm_path(), out_dir)          # a build step (torch + transformers)
    spec = EncoderSpec.load(out_dir)
    tokenizer = EncoderTokenizer(out_dir, spec)            # serving needs only ``tokenizers``
    feed = tokenizer.encode(["hello", "a longer text"])    # name -> int64 array, padded
    vectors = pool(hidden, feed["attention_mask"], "mean", normalize=True)

Serving needs neither torch nor transformers: the tokenizer runs through the ``tokenizers`` library.
``EncoderSession`` is the embedding session both runtimes share; each gives it a blocking ``infer``.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from xpuflow.backends.base import BatchMode, ModelConfig, ModelTask, Session
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.errors import BackendUnavailable, ConfigError, SessionError, XpuflowError
from xpuflow.types import Resource

__all__ = [
    "DEFAULT_OPSET",
    "ENCODER_SPEC_NAME",
    "ONNX_MODEL_NAME",
    "POOLING_MODES",
    "EncoderSession",
    "EncoderSource",
    "EncoderSpec",
    "EncoderTokenizer",
    "check_pooling",
    "encoder_max_length",
    "export_encoder",
    "exporter_version",
    "package_version",
    "pool",
    "resolve_encoder_source",
]

ONNX_MODEL_NAME = "model.onnx"
ENCODER_SPEC_NAME = "encoder.json"
#: Opset 17 has LayerNormalization as one op, and every ONNX Runtime and OpenVINO of the last years reads it.
DEFAULT_OPSET = 17
POOLING_MODES = ("mean", "cls")

_OUTPUT_NAME = "last_hidden_state"
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Tokenizers report a huge sentinel (int(1e30)) when they know no limit.
_NO_LIMIT = 1_000_000
_SAMPLE_TEXTS = ["xpuflow export sample", "a second, longer sample sentence so the trace sees padding"]


def package_version(name: str) -> str:
    """The installed version of a distribution, or "missing". Never imports it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def exporter_version() -> str:
    """What the export's output depends on, for the build profile's ``compiler_version``."""
    return "; ".join(f"{name} {package_version(name)}" for name in ("torch", "transformers", "onnx"))


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder comes from: a Hugging Face folder (``kind`` "hf", exported by a build) or a
    ready ``.onnx`` file (``kind`` "onnx", run as it is, with ``tokenizer.json`` beside it)."""

    kind: str
    path: Path

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def resolve_encoder_source(config: ModelConfig, backend: str) -> EncoderSource:
    """Check that ``config`` names an encoder this module can serve. Raises ConfigError saying what to fix."""
    if config.task is not ModelTask.EMBEDDING:
        raise ConfigError(
            f"the {backend} backend serves embeddings only (task: embedding), not task "
            f"'{config.task.value}'; use the transformers or llamacpp backend for chat and completion",
            field="task",
        )
    path = config.path
    what = "a Hugging Face encoder folder (with config.json) or a .onnx file"
    if path is None:
        raise ConfigError(f"the {backend} backend needs a model path: {what}", field="model")
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist; pass {what}", field="model")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {path} has no config.json, so it is not a Hugging Face model; pass {what}",
                field="model",
            )
        return EncoderSource("hf", path)
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"model file {path} is not a .onnx file; pass {what}", field="model")
    if not (path.parent / "tokenizer.json").is_file():
        raise ConfigError(
            f"{path.parent} has no tokenizer.json next to {path.name}; save the model's fast tokenizer "
            "there (tokenizer.save_pretrained) or pass the Hugging Face folder instead",
            field="model",
        )
    return EncoderSource("onnx", path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def encoder_max_length(folder: Path, configured: int, tokenizer_max: int | None = None) -> int:
    """The longest input in tokens: the smallest of the configured length, the model's position
    embeddings, the tokenizer's limit and sentence-transformers' ``max_seq_length`` (what the model
    was trained to embed, e.g. 256 for all-MiniLM-L6-v2)."""
    limits = [configured]
    positions = _read_json(folder / "config.json").get("max_position_embeddings")
    st_limit = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if tokenizer_max is None:
        tokenizer_max = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    for value in (positions, st_limit, tokenizer_max):
        if isinstance(value, (int, float)) and 0 < value < _NO_LIMIT:
            limits.append(int(value))
    return min(limits)


def _default_pooling(folder: Path) -> str:
    """The pooling sentence-transformers would use for this model (mean unless it says CLS)."""
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    return (
        "cls"
        if pooling.get("pooling_mode_cls_token") and not pooling.get("pooling_mode_mean_tokens")
        else "mean"
    )


@dataclass(frozen=True)
class EncoderSpec:
    """How to feed an exported encoder and read its output; stored as ``encoder.json``."""

    inputs: tuple[str, ...]
    output: str = _OUTPUT_NAME
    max_length: int = 512
    pooling: str = "mean"
    pad_token: str = "[PAD]"
    pad_token_id: int = 0
    opset: int | None = None

    def save(self, folder: Path) -> None:
        data = asdict(self)
        data["inputs"] = list(self.inputs)
        (folder / ENCODER_SPEC_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> EncoderSpec:
        """Read ``encoder.json`` from ``folder``. Raises ConfigError when it is missing or invalid."""
        data = _read_json(folder / ENCODER_SPEC_NAME)
        try:
            return cls(**{**data, "inputs": tuple(data["inputs"])})
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"{folder / ENCODER_SPEC_NAME} is missing or invalid ({exc}); rebuild the artifact"
            ) from exc

    @classmethod
    def derive(cls, folder: Path, inputs: Sequence[str], output: str) -> EncoderSpec:
        """A spec for a ready ``.onnx`` file, from the model's input names and the files beside it."""
        unknown = [name for name in inputs if name not in _KNOWN_INPUTS]
        if unknown:
            raise ConfigError(
                f"the ONNX model in {folder} takes inputs {', '.join(unknown)}, but an encoder is fed only "
                f"{', '.join(_KNOWN_INPUTS)}; export it with those inputs",
                field="model",
            )
        pad = _read_json(folder / "tokenizer_config.json").get("pad_token")
        pad_token = pad.get("content") if isinstance(pad, dict) else pad
        pad_token = pad_token if isinstance(pad_token, str) else "[PAD]"
        return cls(
            inputs=tuple(inputs),
            output=output,
            max_length=encoder_max_length(folder, _NO_LIMIT - 1),
            pooling=_default_pooling(folder),
            pad_token=pad_token,
            pad_token_id=_token_id(folder, pad_token),
        )


def _token_id(folder: Path, token: str) -> int:
    tokenizer = _load_tokenizers(folder)
    found = tokenizer.token_to_id(token)
    return int(found) if found is not None else 0


def _load_tokenizers(folder: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise BackendUnavailable(
            "the 'tokenizers' package is not installed; pip install tokenizers (it comes with transformers)"
        ) from exc
    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises plain Exceptions for unreadable files
        raise ConfigError(f"cannot read {folder / 'tokenizer.json'}: {exc}", field="model") from exc


def export_encoder(model_dir: Path, out_dir: Path, *, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export the Hugging Face encoder in ``model_dir`` to ``out_dir`` (see the module docstring).

    Returns a JSON-able summary for the artifact's metadata. Raises BackendUnavailable without torch
    or transformers. The export runs in fp32 with eager attention, the most portable graph. The spec's
    ``max_length`` is the model's own limit; sessions lower it to the deployment's ``max_seq_len``.
    """
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable(
            f"exporting {model_dir} to ONNX needs torch and transformers ({exc}); "
            "pip install 'xpuflow[transformers]', or pass a ready .onnx file as the model"
        ) from exc

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # The model is loaded for this export only: the TorchScript exporter leaves it in training mode.
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager")
    model = model.float().eval()
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in tokenizer.model_input_names if n in accepted and n in _KNOWN_INPUTS]
    if "input_ids" not in names or "attention_mask" not in names:
        raise ConfigError(
            f"the tokenizer in {model_dir} yields {tokenizer.model_input_names}; an encoder export needs "
            "input_ids and attention_mask",
            field="model",
        )
    sample = tokenizer(_SAMPLE_TEXTS, padding=True, return_tensors="pt")
    wrapper = _last_hidden_state_module(torch, model, names)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, _OUTPUT_NAME]}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and that traced shape checks become
        # constants; both are expected here, and the graph is checked against torch in the tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(sample[name] for name in names),
            str(out_dir / ONNX_MODEL_NAME),
            input_names=names,
            output_names=[_OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,  # the torch.export-based exporter needs onnxscript, which xpuflow does not require
        )
    tokenizer.save_pretrained(out_dir)
    if (model_dir / "sentence_bert_config.json").is_file():
        shutil.copyfile(model_dir / "sentence_bert_config.json", out_dir / "sentence_bert_config.json")
    pad_token = tokenizer.pad_token if isinstance(tokenizer.pad_token, str) else "[PAD]"
    spec = EncoderSpec(
        inputs=tuple(names),
        output=_OUTPUT_NAME,
        max_length=encoder_max_length(model_dir, _NO_LIMIT - 1, tokenizer.model_max_length),
        pooling=_default_pooling(model_dir),
        pad_token=pad_token,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        opset=opset,
    )
    spec.save(out_dir)
    return {
        "source": "hf",
        "architecture": str(getattr(model.config, "model_type", "unknown")),
        "hidden_size": int(getattr(model.config, "hidden_size", 0) or 0),
        "inputs": list(names),
        "opset": opset,
        "max_length": spec.max_length,
        "onnx_bytes": (out_dir / ONNX_MODEL_NAME).stat().st_size,
    }


def _last_hidden_state_module(torch: Any, model: Any, names: Sequence[str]) -> Any:
    """A module taking the inputs positionally and returning only last_hidden_state, because the
    exporter traces positional tensors and a single output keeps the graph's contract simple."""

    class LastHiddenState(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors, strict=True))).last_hidden_state

    return LastHiddenState()


class EncoderTokenizer:
    """Turns texts into the int64 arrays ``spec.inputs`` names, truncated to ``max_length`` tokens
    (default and upper bound: ``spec.max_length``)."""

    def __init__(self, folder: Path, spec: EncoderSpec, max_length: int | None = None) -> None:
        self.spec = spec
        self.max_length = min(spec.max_length, max_length or spec.max_length)
        self._tokenizer = _load_tokenizers(folder)
        self._tokenizer.no_padding()  # batches are padded per chunk, after sorting by length
        self._tokenizer.enable_truncation(max_length=self.max_length)

    def token_lists(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, type_ids) per text, unpadded."""
        return [(e.ids, e.type_ids) for e in self._tokenizer.encode_batch(list(texts))]

    def pad(self, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """One padded batch (right padding: pooling masks the pads out) as name -> int64 array."""
        import numpy as np

        width = max(len(ids) for ids, _ in encoded)
        batch = len(encoded)
        input_ids = np.full((batch, width), self.spec.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        token_type_ids = np.zeros((batch, width), dtype=np.int64)
        for row, (ids, type_ids) in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            token_type_ids[row, : len(type_ids)] = type_ids
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return {name: arrays[name] for name in self.spec.inputs}

    def encode(self, texts: Sequence[str]) -> dict[str, Any]:
        return self.pad(self.token_lists(texts))


def pool(hidden: Any, attention_mask: Any, pooling: str = "mean", *, normalize: bool = True) -> Any:
    """Sentence vectors [batch, hidden] from token states [batch, sequence, hidden]: the mean over real
    tokens (``attention_mask`` 1) or the first token's state, scaled to unit length when ``normalize``."""
    import numpy as np

    states = np.asarray(hidden, dtype=np.float32)
    if pooling == "cls":
        vectors = states[:, 0]
    else:
        mask = np.asarray(attention_mask, dtype=np.float32)[..., None]
        vectors = (states * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    if normalize:
        vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return vectors


def check_pooling(options: Mapping[str, Any], default: str) -> str:
    pooling = options.get("pooling", default)
    if pooling not in POOLING_MODES:
        raise ConfigError(
            f"options.pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}",
            field="options.pooling",
        )
    return str(pooling)


class EncoderSession(Session):
    """Embeddings from an exported encoder. ``infer(feed) -> last_hidden_state`` runs on the session's
    single model thread; texts are sorted by length and cut into batches of ``max_batch_size``, so a
    batch pads to similar lengths, and the vectors come back in the callers' order."""

    batch_mode = BatchMode.NATIVE

    def __init__(
        self,
        model_id: str,
        resources: Sequence[Resource],
        *,
        backend: str,
        tokenizer: EncoderTokenizer,
        infer: Callable[[dict[str, Any]], Any],
        runner: BlockingRunner,
        max_batch_size: int,
        pooling: str,
        normalize: bool,
        release: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(model_id, resources)
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.pooling = pooling
        self.normalize = normalize
        self._tokenizer = tokenizer
        self._infer = infer
        self._runner = runner
        self._release = release

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order. Raises ConfigError for non-text input, SessionError on failure."""
        if self.closed:
            raise SessionError(
                f"{self.backend} session for model '{self.model_id}' is closed; create a new one"
            )
        items = list(texts)
        bad = next((i for i, t in enumerate(items) if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"input {bad} is a {type(items[bad]).__name__}, not text", field="input")
        if not items:
            return []
        try:
            return await self._runner.call(self._embed_blocking, items)
        except XpuflowError:
            raise
        except Exception as exc:
            raise SessionError(
                f"{self.backend} failed embeddings for model '{self.model_id}': {type(exc).__name__}: {exc}"
            ) from exc

    def _embed_blocking(self, texts: list[str]) -> list[list[float]]:
        import numpy as np

        encoded = self._tokenizer.token_lists(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
        vectors: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            feed = self._tokenizer.pad([encoded[i] for i in rows])
            pooled = pool(self._infer(feed), feed["attention_mask"], self.pooling, normalize=self.normalize)
            if not np.isfinite(pooled).all():
                raise SessionError(
                    f"{self.backend} returned non-finite embeddings for model '{self.model_id}'; "
                    "try precision fp32"
                )
            for row, vector in zip(rows, pooled, strict=True):
                vectors[row] = [float(x) for x in vector]
        return vectors

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._release is not None:
                await self._runner.call(self._release)
        finally:
            self._runner.close()
