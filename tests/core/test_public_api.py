from __future__ import annotations

import json
import subprocess
import sys

import xpuflow

PINNED = [
    "AdaptiveRouter",
    "Alternative",
    "BackendError",
    "BackendPlugin",
    "BuildArtifact",
    "BuildProfile",
    "Capability",
    "CapabilityError",
    "ComplexityScorer",
    "ConfigError",
    "DeviceRouter",
    "DeviceRuntime",
    "GenerationParams",
    "Inventory",
    "ModelConfig",
    "OptimizedFor",
    "Precision",
    "Resource",
    "ResourceType",
    "RoutingConfig",
    "RoutingDecision",
    "Session",
    "Strategy",
    "Task",
    "XpuflowError",
    "__version__",
    "advise",
    "deinit",
    "detect",
    "get_backend",
    "init",
    "list_backends",
    "load_config",
    "runtime",
]


def test_public_all_is_pinned() -> None:
    assert sorted(xpuflow.__all__) == sorted(PINNED)


def test_every_public_name_resolves() -> None:
    for name in xpuflow.__all__:
        assert getattr(xpuflow, name) is not None, name


def test_runtime_stays_a_function_after_its_module_is_imported() -> None:
    import xpuflow.device_runtime

    assert callable(xpuflow.runtime)


def test_import_loads_no_vendor_or_heavy_library() -> None:
    code = (
        "import sys, json, xpuflow; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch','pynvml','amdsmi','llama_cpp','onnxruntime','openvino','transformers','pydantic',"
        "'typer','rich','numpy','aiohttp'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
