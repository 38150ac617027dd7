"""Fuzz a gateway against its own OpenAPI document (``GET /openapi.json``) with schemathesis.

Each case is a request schemathesis draws from the document: valid bodies, headers and paths
("positive") and invalid ones ("negative"), spread evenly over the operations. Every response is counted
by status and checked: no 5xx, a status, content type, headers and body the document allows, invalid
data refused with a 4xx and valid data not refused::

    summary = run_fuzz("http://127.0.0.1:8000", max_cases=5000, api_key="sk-...")
    summary["cases"], summary["server_errors"], summary["nonconforming"], summary["by_status"]

``fuzz_app(app, max_cases)`` does the same in-process, through schemathesis's ASGI transport. Needs the
``schemathesis`` package (the ``dev`` extra); it is imported only when a fuzz runs. Send traffic only to
a gateway you run: the admin operations are called too (with ``api_key``, an inference key gets 403).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

__all__ = ["fuzz_app", "run_fuzz"]

#: The checks every response goes through (schemathesis names). The stateful and auth-replay checks
#: are left out: they re-send requests, so the counts would no longer be the cases drawn.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
)
_MAX_FAILURES_KEPT = 20
_MAX_ROUNDS = 50
_INFERENCE_WEIGHT = 6


def _checks() -> list[Any]:
    from schemathesis import checks as core_checks
    from schemathesis.specs.openapi import checks as openapi_checks

    return [getattr(core_checks, n, None) or getattr(openapi_checks, n) for n in CHECKS]


def _fuzz(
    schema: Any, max_cases: int, headers: dict[str, str], call_kwargs: dict[str, Any], seed: int | None
) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.failures import Failure, FailureGroup
    from schemathesis.core.result import Ok

    if max_cases < 1:
        raise ValueError(f"max_cases must be at least 1, got {max_cases}")
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    checks = _checks()
    by_status: Counter[int] = Counter()
    by_operation: Counter[str] = Counter()
    failures: list[str] = []
    counts = {"cases": 0, "nonconforming": 0, "transport_errors": 0}
    started = time.perf_counter()

    def run_one(case: Any) -> None:
        counts["cases"] += 1
        by_operation[case.operation.label] += 1
        try:
            response = case.call(headers=headers, **call_kwargs)
        except Exception as exc:  # the server closed the connection, timed out, ...
            counts["transport_errors"] += 1
            if len(failures) < _MAX_FAILURES_KEPT:
                failures.append(f"{case.operation.label}: {type(exc).__name__}: {exc}")
            return
        by_status[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks, headers=headers, transport_kwargs=call_kwargs)
        except (FailureGroup, Failure) as exc:
            counts["nonconforming"] += 1
            if len(failures) < _MAX_FAILURES_KEPT:
                failures.append(f"{case.operation.label} -> {response.status_code}: {exc}".strip()[:2000])

    # Hypothesis stops early on operations whose inputs are few (GET /health has one), so rounds go on
    # until the cases add up, with a fresh random stream each round.
    plans = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    # the inference bodies are where the inputs (and the bugs) are: they get most of the cases
    weights = [
        _INFERENCE_WEIGHT if op.method.upper() == "POST" and op.path.startswith("/v1/") else 1
        for op, _ in plans
    ]
    for round_number in range(_MAX_ROUNDS):
        before = counts["cases"]
        for index, (operation, mode) in enumerate(plans):
            left = max_cases - counts["cases"]
            if left <= 0:
                break
            share = max(1, -(-left * weights[index] // sum(weights[index:])))
            decorate: Any = given(operation.as_strategy(generation_mode=mode))
            test: Any = decorate(run_one)
            test = settings(
                max_examples=share,
                deadline=None,
                database=None,
                derandomize=False,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            )(test)
            if seed is not None:
                test = hypothesis_seed(seed + round_number * len(plans) + index)(test)
            try:
                test()
            except Unsatisfiable:
                pass  # no invalid input exists (GET /health has no parameters): nothing to send
            except Exception as exc:  # an operation whose data cannot be generated: note it, go on
                if len(failures) < _MAX_FAILURES_KEPT:
                    failures.append(f"{operation.label} ({mode}): generation failed: {exc}")
        if counts["cases"] >= max_cases or counts["cases"] == before:
            break
    return {
        "cases": counts["cases"],
        "server_errors": sum(n for status, n in by_status.items() if status >= 500),
        "nonconforming": counts["nonconforming"],
        "transport_errors": counts["transport_errors"],
        "by_status": {str(status): by_status[status] for status in sorted(by_status)},
        "by_operation": dict(sorted(by_operation.items())),
        "failures": failures,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def run_fuzz(
    base_url: str,
    max_cases: int,
    api_key: str | None = None,
    *,
    seed: int | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Fuzz the live gateway at ``base_url`` (``http://127.0.0.1:8000``) with about ``max_cases``
    requests drawn from its ``/openapi.json``; ``api_key`` is sent as a bearer token.

    Returns ``cases`` (requests sent), ``server_errors`` (5xx answers), ``nonconforming`` (responses
    that failed a check), ``transport_errors`` (no HTTP answer), ``by_status``, ``by_operation``,
    ``failures`` (the first 20, described) and ``elapsed_s``. ``cases`` falls short of ``max_cases``
    only when the document offers fewer distinct inputs."""
    import requests
    import schemathesis

    base_url = base_url.rstrip("/")
    headers = _auth(api_key)
    schema = schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", headers=headers or None, timeout=timeout_s
    )
    with requests.Session() as session:
        return _fuzz(
            schema, max_cases, headers, {"base_url": base_url, "session": session, "timeout": timeout_s}, seed
        )


def fuzz_app(
    app: Any, max_cases: int, api_key: str | None = None, *, seed: int | None = None
) -> dict[str, Any]:
    """``run_fuzz`` against an ASGI app in this process (its ``/openapi.json`` is read the same way)."""
    import schemathesis

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return _fuzz(schema, max_cases, _auth(api_key), {}, seed)
