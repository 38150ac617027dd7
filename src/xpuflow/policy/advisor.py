"""The workload advisor: which device should run a model, what it will need, and why (pure).

``advise_workload`` is a filter -> score -> choose over the inventory's resources::

    decision = advise_workload(inventory, model_size=7e9, batch_size=4, precision="fp16")
    decision.device          # "cuda:0"
    decision.reason          # "cuda:0 (NVIDIA H100) has the best balance of latency and throughput ..."
    decision.alternatives    # every other resource, each with the reason it lost

1. Filter: a resource is refused when it cannot run the task (training never goes to an NPU, PIM part or
   remote server), the precision (an NPU has no fp32) or the model format (llama.cpp has no NPU backend),
   or when the estimated memory does not fit what it has free. Each refusal is a sentence with numbers.
2. Score: a roofline estimate per device (``device_model``) gives latency per step, throughput and
   energy per sample; the strategy turns them into a score, normalised so the best device scores 1.
3. Choose: the highest score wins (inventory order breaks ties). ``power`` never picks a discrete GPU or
   a remote server while a CPU, iGPU, NPU or PIM part fits. Confidence comes from the margin over the
   runner-up.

The requested precision is never changed: faster precisions the chosen device offers are listed in
``details["hints"]``. ``docs/advisor.md`` documents the memory formula and the scoring model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.policy.device_model import (
    FRAGMENTATION,
    RUNTIME_OVERHEAD_BYTES,
    DeviceProfile,
    PrecisionSupport,
    profile_inventory,
)
from xpuflow.types import Alternative, Precision, ResourceType, RoutingDecision, Strategy, Task

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "VALID_PRECISIONS",
    "VALID_STRATEGIES",
    "VALID_TASKS",
    "MemoryEstimate",
    "advise_workload",
    "estimate_memory",
]

#: Tokens of context per sequence that the KV cache and activations are sized for.
DEFAULT_CONTEXT_TOKENS = 2048
VALID_PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)
VALID_STRATEGIES: tuple[str, ...] = tuple(s.value for s in Strategy)
VALID_TASKS: tuple[str, ...] = tuple(t.value for t in Task)

_MAX_MODEL_SIZE = 1e15  # parameters; beyond this the input is a unit mistake, not a model
_MAX_BATCH_SIZE = 1 << 30
_MAX_CONTEXT_TOKENS = 1 << 27

# str-valued enums hash and compare like their values, so one dict serves both spellings.
_PRECISIONS: dict[str, Precision] = {p.value: p for p in Precision}
_STRATEGIES: dict[str, Strategy] = {s.value: s for s in Strategy}
_TASKS: dict[str, Task] = {t.value: t for t in Task}
# Enum.value is a descriptor (slow on the hot path); a dict lookup is not.
_VALUES: dict[Precision | Strategy | Task, str] = {m: m.value for m in (*Precision, *Strategy, *Task)}

_BYTES_PER_PARAM: dict[Precision, float] = {p: p.bytes_per_param for p in Precision}
# KV cache and activation element sizes: quantised weights keep a 16-bit KV cache and 16-bit activations.
_KV_BYTES: dict[Precision, float] = {
    Precision.FP32: 4.0,
    Precision.FP16: 2.0,
    Precision.BF16: 2.0,
    Precision.FP8: 1.0,
    Precision.INT8: 2.0,
    Precision.INT4: 2.0,
}
_ACT_BYTES: dict[Precision, float] = {p: 4.0 if p is Precision.FP32 else 2.0 for p in Precision}
# Shape of a transformer with P parameters: P ~ 12 * layers * d_model**2 with d_model ~ 128 * layers.
_SHAPE_K = 128.0 / 12.0
_THIRD = 1.0 / 3.0
_HEAD_DIM_PER_LAYER = 128.0
_ADAPTER_FRACTION = 0.01  # trainable share of parameters when training on int8/int4 weights (LoRA)
_PIPELINED = 0.1  # share of the dispatch cost that a pipelined (throughput) run does not hide
_GIB = float(1 << 30)
_MIB = float(1 << 20)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes a workload needs on one kind of device. ``total_bytes`` is what must be free."""

    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    overhead_bytes: int
    total_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activations_bytes": self.activations_bytes,
            "gradients_bytes": self.gradients_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
        }


# ------------------------------------------------------------------------------------------ validation


def _check_model_size(value: Any) -> float:
    if type(value) is float or type(value) is int:
        number = float(value)
    elif isinstance(value, bool) or not hasattr(value, "__float__") or isinstance(value, (str, bytes)):
        raise ConfigError(
            f"model_size must be a number of parameters such as 7e9, got {value!r}", field="model_size"
        )
    else:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(
                f"model_size must be a number of parameters, got {value!r}", field="model_size"
            ) from exc
    if not (0.0 < number <= _MAX_MODEL_SIZE):  # also false for NaN
        raise ConfigError(
            f"model_size must be a positive, finite number of parameters up to {_MAX_MODEL_SIZE:.0e}"
            f" (e.g. 7e9 for a 7B model), got {value!r}",
            field="model_size",
        )
    return number


def _check_count(value: Any, name: str, upper: int) -> int:
    if type(value) is int and 1 <= value <= upper:
        return value
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or not 1 <= number <= upper:
        raise ConfigError(f"{name} must be an integer from 1 to {upper}, got {value!r}", field=name)
    return number


def _parse(value: Any, table: Mapping[str, Any], name: str, valid: tuple[str, ...]) -> Any:
    try:
        found = table.get(value)
    except TypeError:  # unhashable
        found = None
    if found is not None:
        return found
    raw = getattr(value, "value", value)  # enums from other libraries (device-router's RoutingStrategy)
    if isinstance(raw, str):
        found = table.get(raw.strip().lower())
        if found is not None:
            return found
    raise ConfigError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}", field=name)


def _check_format(value: Any) -> str | None:
    if value is None:
        return None
    raw = getattr(value, "value", value)
    if not isinstance(raw, str):
        raise ConfigError(
            f"model_format must be a string such as 'onnx' or 'gguf' (or None), got {value!r}",
            field="model_format",
        )
    text = raw.strip().lower().lstrip(".")
    return text or None


# ---------------------------------------------------------------------------------------- memory model


def _tensor_terms(
    params: float, batch: int, precision: Precision, training: bool, context: int
) -> tuple[float, float, float, float, float]:
    """(weights, kv_cache, activations, gradients, optimizer) bytes; see docs/advisor.md."""
    d_model = (params * _SHAPE_K) ** _THIRD
    layers = max(d_model / _HEAD_DIM_PER_LAYER, 1.0)
    weights = params * _BYTES_PER_PARAM[precision]
    tokens = batch * context
    if not training:
        kv = tokens * 2.0 * layers * d_model * _KV_BYTES[precision]
        activations = tokens * 8.0 * d_model * _ACT_BYTES[precision]
        return weights, kv, activations, 0.0, 0.0
    # Stored activations per layer and token: ~34 bytes per hidden unit in 16-bit (Korthikanti et al. 2022,
    # with flash attention), i.e. 17 elements.
    activations = tokens * layers * d_model * 17.0 * _ACT_BYTES[precision]
    if precision is Precision.INT8 or precision is Precision.INT4:
        adapters = _ADAPTER_FRACTION * params  # frozen quantised base + LoRA adapters in bf16 with Adam
        return weights + 2.0 * adapters, 0.0, activations, 2.0 * adapters, 12.0 * adapters
    if precision is Precision.FP32:
        return weights, 0.0, activations, 4.0 * params, 8.0 * params  # fp32 grads + Adam m and v
    # Mixed precision: 16-bit grads, fp32 master weights + Adam m and v (16 bytes/param in all).
    return weights, 0.0, activations, max(_BYTES_PER_PARAM[precision], 2.0) * params, 12.0 * params


def estimate_memory(
    model_size: float,
    batch_size: int = 1,
    precision: Precision | str = "fp32",
    task: Task | str = "inference",
    *,
    device_type: ResourceType | str = ResourceType.GPU,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> MemoryEstimate:
    """The advisor's memory estimate for one workload on one kind of device (validated like the advisor).

    >>> estimate_memory(7e9, precision="fp16").weights_bytes
    14000000000
    """
    params = _check_model_size(model_size)
    batch = _check_count(batch_size, "batch_size", _MAX_BATCH_SIZE)
    context = _check_count(context_tokens, "context_tokens", _MAX_CONTEXT_TOKENS)
    prec: Precision = _parse(precision, _PRECISIONS, "precision", VALID_PRECISIONS)
    tsk: Task = _parse(task, _TASKS, "task", VALID_TASKS)
    try:
        kind = ResourceType(getattr(device_type, "value", device_type))
    except ValueError as exc:
        valid = ", ".join(t.value for t in ResourceType)
        raise ConfigError(
            f"unknown device_type {device_type!r}; valid values: {valid}", field="device_type"
        ) from exc
    weights, kv, activations, gradients, optimizer = (
        int(t) for t in _tensor_terms(params, batch, prec, tsk is Task.TRAINING, context)
    )
    tensors = weights + kv + activations + gradients + optimizer
    total = int(tensors * FRAGMENTATION[kind]) + RUNTIME_OVERHEAD_BYTES[kind]
    return MemoryEstimate(
        weights,
        kv,
        activations,
        gradients,
        optimizer,
        total - tensors,
        total,
    )


# ------------------------------------------------------------------------------------------ formatting


def _size(num_bytes: float) -> str:
    if num_bytes >= _GIB:
        return f"{num_bytes / _GIB:.1f} GiB"
    return f"{num_bytes / _MIB:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _rate(per_s: float) -> str:
    if per_s >= 100.0:
        return f"{per_s:,.0f}"
    if per_s >= 1.0:
        return f"{per_s:.1f}"
    return f"{per_s:.3g}"


def _energy(joules: float) -> str:
    if joules >= 1.0:
        return f"{joules:.2f} J"
    return f"{joules * 1e3:.3g} mJ"


def _params(params: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:.0f}"


# ---------------------------------------------------------------------------------------------- advise

# One fitting candidate: (index, profile, need_bytes, latency_s, throughput_per_s, energy_j, factor,
# support, format_path). Plain tuples: the hot path builds no objects it does not return.
_Candidate = tuple[int, DeviceProfile, int, float, float, float, float, PrecisionSupport, str]


def advise_workload(
    inventory: Any,
    model_size: float,
    batch_size: int = 1,
    precision: Precision | str = "fp32",
    strategy: Strategy | str = "auto",
    task: Task | str = "inference",
    model_format: str | None = None,
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> RoutingDecision:
    """Choose the device for a workload: pure, deterministic, and explained.

    ``model_size`` is the parameter count; ``precision`` the weights' precision (fp32, fp16, bf16, fp8,
    int8, int4), kept as given; ``strategy`` one of auto, latency, throughput, power; ``task`` inference or
    training; ``model_format`` e.g. "onnx" or "gguf" (None: any, xpuflow converts). Strings or enums.

    Returns a ``RoutingDecision`` whose ``alternatives`` name every other resource with the reason it lost.
    Raises ``ConfigError`` (naming the valid values) for bad input and ``CapabilityError`` (with every
    resource's reason and a suggestion) when no resource can run the workload.
    """
    params = _check_model_size(model_size)
    batch = (
        batch_size
        if type(batch_size) is int and 1 <= batch_size <= _MAX_BATCH_SIZE
        else _check_count(batch_size, "batch_size", _MAX_BATCH_SIZE)
    )
    context = (
        context_tokens
        if type(context_tokens) is int and 1 <= context_tokens <= _MAX_CONTEXT_TOKENS
        else (_check_count(context_tokens, "context_tokens", _MAX_CONTEXT_TOKENS))
    )
    prec: Precision = _parse(precision, _PRECISIONS, "precision", VALID_PRECISIONS)
    strat: Strategy = _parse(strategy, _STRATEGIES, "strategy", VALID_STRATEGIES)
    tsk: Task = _parse(task, _TASKS, "task", VALID_TASKS)
    fmt = _check_format(model_format)
    training = tsk is Task.TRAINING

    profiles = profile_inventory(inventory)
    w, k, a, g, o = _tensor_terms(params, batch, prec, training, context)
    weights, kv, activations, grads, optimizer = int(w), int(k), int(a), int(g), int(o)
    tensors = weights + kv + activations + grads + optimizer
    if training:
        ops = 6.0 * params * batch * context  # forward + backward over every token
        traffic = 2.0 * (w + g + o) + a
    else:
        ops = 2.0 * params * batch  # one decode step: every sample produces one token
        traffic = w + 0.5 * k

    # ---- filter
    fitting: list[_Candidate] = []
    refused: list[tuple[int, DeviceProfile, str, bool]] = []  # (index, profile, reason, memory-bound)
    for index, p in enumerate(profiles):
        why = p.training_refused if training else p.inference_refused
        if why:
            refused.append((index, p, why, False))
            continue
        support = p.precisions[prec]
        why = support.training_refused if training and support.training_refused else support.refused
        factor, path = 1.0, ""
        if not why and fmt is not None:
            fs = p.formats.get(fmt)
            if fs is not None:
                why, factor, path = fs.refused, fs.factor, fs.path
        if why:
            refused.append((index, p, why, False))
            continue
        need = int(tensors * p.fragmentation) + p.overhead_bytes
        if need > p.usable_memory_bytes:
            refused.append(
                (
                    index,
                    p,
                    f"needs {_size(need)} but {p.resource_id} has"
                    f" {_size(p.usable_memory_bytes)} {p.memory_phrase}",
                    True,
                )
            )
            continue
        rate = support.training_ops_per_s if training else support.inference_ops_per_s
        compute_s = ops / rate
        memory_s = traffic / p.bandwidth_bytes_per_s
        busy = compute_s if compute_s > memory_s else memory_s
        latency = p.dispatch_s + busy
        fitting.append(
            (
                index,
                p,
                need,
                latency,
                batch / (busy + _PIPELINED * p.dispatch_s),
                p.watts * latency / batch,
                factor,
                support,
                path,
            )
        )
    if not fitting:
        raise _nothing_fits(
            refused=refused,
            params=params,
            batch=batch,
            precision=prec,
            task=tsk,
            fmt=fmt,
            count=len(profiles),
        )

    # ---- score
    if strat is Strategy.LATENCY:
        raw = [c[6] / c[3] for c in fitting]
    elif strat is Strategy.THROUGHPUT or (training and strat is Strategy.AUTO):
        raw = [c[6] * c[4] for c in fitting]
    elif strat is Strategy.POWER:
        raw = [c[6] / c[5] for c in fitting]
    else:  # auto inference: latency and throughput, throughput weighing more as the batch grows
        fastest = min(c[3] for c in fitting)
        most = max(c[4] for c in fitting)
        log_batch = math.log2(batch)
        w = log_batch / (1.0 + log_batch)  # 0 at batch 1, 0.5 at 2, 0.75 at 8, 0.86 at 64
        raw = [c[6] * (fastest / c[3]) ** (1.0 - w) * (c[4] / most) ** w for c in fitting]
    # ---- choose (power keeps discrete GPUs and remotes out while a low-power device fits)
    demote = strat is Strategy.POWER and any(c[1].low_power for c in fitting)
    best = -1
    for i, c in enumerate(fitting):
        if demote and not c[1].low_power:
            continue
        if best < 0 or raw[i] > raw[best]:
            best = i
    top = raw[best]
    scores = [r / top for r in raw]  # the chosen device scores 1.0; a demoted one may score above it
    chosen = fitting[best]
    bp, need, support, path = chosen[1], chosen[2], chosen[7], chosen[8]
    bid = bp.resource_id

    ranked = sorted(
        (i for i in range(len(fitting)) if i != best),
        key=lambda i: (demote and not fitting[i][1].low_power, -scores[i], fitting[i][0]),
    )
    runner = ranked[0] if ranked and not (demote and not fitting[ranked[0]][1].low_power) else -1
    # Confidence from the margin over the runner-up: 0.5 at a tie, 1.0 when nothing else could be chosen.
    confidence = 1.0 if runner < 0 else 0.5 + 0.5 * (1.0 - scores[runner] / scores[best])

    metric = _METRICS[strat if not (training and strat is Strategy.AUTO) else Strategy.THROUGHPUT]
    best_text = metric(chosen)
    runner_text = ""
    alternatives: list[Alternative] = []
    for i in ranked:
        c = fitting[i]
        cp = c[1]
        if demote and not cp.low_power:
            reason = (
                "the power strategy keeps discrete GPUs and remote servers for when no low-power device"
                f" fits; {bid} fits at ~{bp.watts:.0f} W while {cp.resource_id} draws ~{cp.watts:.0f} W"
            )
        else:
            text = metric(c)
            if i == runner:
                runner_text = text
            reason = f"scored {scores[i]:.2f} vs 1.00 for {bid}: {text} vs {best_text}"
            if c[7].note:
                reason += f" ({c[7].note})"
        alternatives.append(Alternative(cp.resource_id, reason, round(scores[i], 4)))
    for _index, rp, why, _memory in refused:
        alternatives.append(Alternative(rp.resource_id, why))

    # ---- explain
    use_amp = training and support.use_amp
    claim = _TRAINING_CLAIM if training and strat in _THROUGHPUT_LIKE else _CLAIMS[strat]
    reason = f"{bid} ({bp.name}) {claim}{best_text}"
    if runner >= 0:
        reason += f" vs {runner_text} on {fitting[runner][1].resource_id}"
    reason += ")"
    if path:
        reason += f", running the {fmt} file through {path}"
    if training:
        reason += (
            f", training with AMP ({support.amp_dtype} autocast)"
            if use_amp
            else f", training in {_VALUES[prec]}"
        )
    reason += f"; it needs {_size(need)} of {_size(bp.usable_memory_bytes)} {bp.memory_phrase}"

    details: dict[str, Any] = {
        "task": _VALUES[tsk],
        "model_size": params,
        "batch_size": batch,
        "context_tokens": context,
        "model_format": fmt,
        "scores": {fitting[i][1].resource_id: round(scores[i], 4) for i in range(len(fitting))},
        "memory": {
            "weights_bytes": weights,
            "kv_cache_bytes": kv,
            "activations_bytes": activations,
            "gradients_bytes": grads,
            "optimizer_bytes": optimizer,
            "overhead_bytes": need - tensors,
            "total_bytes": need,
        },
        "usable_memory_bytes": {p.resource_id: p.usable_memory_bytes for p in profiles},
        "estimates": {
            c[1].resource_id: {
                "latency_s": c[3],
                "throughput_per_s": c[4],
                "energy_j_per_sample": c[5],
                "watts": c[1].watts,
            }
            for c in fitting
        },
        "hints": support.hints + bp.notes,
    }
    if support.note:
        details["precision_note"] = support.note
    if use_amp:
        details["amp_dtype"] = support.amp_dtype
    return RoutingDecision(
        device=bid,
        reason=reason,
        confidence=confidence,
        alternatives=tuple(alternatives),
        precision=_VALUES[prec],
        use_amp=use_amp,
        estimated_memory_bytes=need,
        strategy=_VALUES[strat],
        details=details,
    )


def _latency_text(c: _Candidate) -> str:
    return f"{_duration(c[3])} per step"


def _throughput_text(c: _Candidate) -> str:
    return f"{_rate(c[4])} samples/s"


def _energy_text(c: _Candidate) -> str:
    return f"{_energy(c[5])} per sample at ~{c[1].watts:.0f} W"


def _auto_text(c: _Candidate) -> str:
    return f"{_duration(c[3])} per step and {_rate(c[4])} samples/s"


_METRICS = {
    Strategy.LATENCY: _latency_text,
    Strategy.THROUGHPUT: _throughput_text,
    Strategy.POWER: _energy_text,
    Strategy.AUTO: _auto_text,
}
_CLAIMS = {
    Strategy.LATENCY: "has the lowest estimated latency (",
    Strategy.THROUGHPUT: "has the highest estimated throughput (",
    Strategy.POWER: "uses the least energy (",
    Strategy.AUTO: "has the best balance of latency and throughput (",
}
_TRAINING_CLAIM = "has the highest estimated training throughput ("
_THROUGHPUT_LIKE = frozenset({Strategy.AUTO, Strategy.THROUGHPUT})


def _nothing_fits(
    *,
    refused: list[tuple[int, DeviceProfile, str, bool]],
    params: float,
    batch: int,
    precision: Precision,
    task: Task,
    fmt: str | None,
    count: int,
) -> CapabilityError:
    what = f"a {_params(params)}-parameter {precision.value} model for {task.value} at batch {batch}"
    if fmt:
        what += f" from a {fmt} file"
    if not count:
        return CapabilityError(
            f"no device can run {what}: the inventory is empty; run detection or declare resources"
        )
    reasons = tuple(f"{p.resource_id}: {why}" for _, p, why, _ in refused)
    if any(memory for *_, memory in refused):
        smaller = [
            p.value
            for p in (Precision.INT8, Precision.INT4)
            if _BYTES_PER_PARAM[p] < _BYTES_PER_PARAM[precision]
        ]
        if precision is Precision.FP32:
            smaller.insert(0, "fp16")
        suggestion = (
            f"use precision {'/'.join(smaller)} or a smaller batch" if smaller else "use a smaller batch"
        ) + " (or add a device with more memory)"
    else:
        suggestion = "change the precision, task or model format, or add a device that supports them"
    return CapabilityError(f"no device can run {what}: {'; '.join(reasons)}; {suggestion}", reasons=reasons)
