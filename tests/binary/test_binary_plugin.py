"""BinaryPlugin end to end: probe, profiles, build through the artifact store, sessions that compute."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xpuflow.artifacts.builder import build_all
from xpuflow.artifacts.profile import BuildArtifact, BuildInterface
from xpuflow.artifacts.store import ArtifactStore
from xpuflow.backends.base import BatchMode, ModelConfig
from xpuflow.backends.binary.plugin import BinaryPlugin, BinarySession
from xpuflow.backends.registry import get_backend
from xpuflow.errors import BuildError, CapabilityError, ConfigError, SessionError, VendorRuntimeError
from xpuflow.types import Resource, ResourceType
from xpuflow.vendor_ref import ReferenceStack, mlp_forward

CPU = Resource("cpu", ResourceType.CPU, "host")
REF_NPU = Resource("npu:0", ResourceType.NPU, "refnpu", {"vendor": "xpuflow-refnpu"})
OTHER_NPU = Resource("npu:1", ResourceType.NPU, "Intel NPU", {"vendor": "intel"})
GPU = Resource("cuda:0", ResourceType.GPU, "H100", {"vendor": "nvidia"})


def _config(spec: Path | str, model: Path, **options: Any) -> ModelConfig:
    return ModelConfig(
        model_id="mlp",
        path=model,
        task="tensor",
        max_batch_size=8,
        options={"spec": str(spec), **options},
    )


def test_registered_as_binary() -> None:
    plugin = get_backend("binary")
    assert isinstance(plugin, BinaryPlugin)
    assert plugin.name == "binary"


def test_availability_and_probe_never_raise(tmp_path: Path) -> None:
    plugin = BinaryPlugin()
    assert plugin.availability().available
    assert (
        "emulated on the host CPU" in plugin.availability().reason
        or "C compiler" in plugin.availability().reason
    )
    # The reference NPU is emulated on the host: it takes the CPU and its own (declared) NPUs only.
    assert [r.id for r in plugin.probe([CPU, REF_NPU, OTHER_NPU, GPU])] == ["cpu", "npu:0"]
    broken = BinaryPlugin(tmp_path / "absent.spec.yaml")
    status = broken.availability()
    assert not status.available
    assert "does not exist" in status.reason
    assert broken.probe([CPU]) == []


def test_non_tensor_tasks_are_refused(tmp_path: Path) -> None:
    config = ModelConfig(
        model_id="chat", path=tmp_path / "m.gguf", task="chat", options={"spec": "reference"}
    )
    plugin = BinaryPlugin()
    with pytest.raises(ConfigError, match="task 'tensor' only") as info:
        plugin.required_build_profiles([CPU], config)
    assert info.value.field == "task"
    capability = plugin.get_capability([CPU], config, {})
    assert "task" in capability.unsupported


@pytest.mark.slow
def test_vendor_spec_availability_runs_the_version_command(refnpu_stack: ReferenceStack) -> None:
    status = BinaryPlugin(refnpu_stack.spec).availability()
    assert status.available
    assert status.version == "1.0.0"
    assert status.reason == "refnpu: refnpu-compile 1.0.0"


@pytest.mark.slow
def test_profile_names_compiler_version_and_options(refnpu_stack: ReferenceStack, mlp_path: Path) -> None:
    plugin = BinaryPlugin()
    (profile,) = plugin.required_build_profiles(
        [CPU], _config(refnpu_stack.spec, mlp_path, compile={"opt_level": 1})
    )
    assert profile.name == "engine"
    assert profile.interface == BuildInterface.CLI
    assert profile.target == ResourceType.NPU
    assert (profile.compiler, profile.compiler_version, profile.backend) == (
        "refnpu-compile",
        "1.0.0",
        "binary",
    )
    assert profile.flags[:2] == ("opt_level=1", "target=refnpu-v1")
    assert profile.flags[2].startswith("template=")
    (default,) = plugin.required_build_profiles([CPU], _config(refnpu_stack.spec, mlp_path))
    assert default.flags[0] == "opt_level=2"
    with pytest.raises(ConfigError) as info:
        plugin.required_build_profiles([CPU], _config(refnpu_stack.spec, mlp_path, compile={"opt_level": 7}))
    assert info.value.field == "compile.opt_level"


@pytest.mark.slow
def test_build_all_then_session_matches_numpy(
    refnpu_stack: ReferenceStack, mlp_path: Path, mlp_layers: list, tmp_path: Path
) -> None:
    plugin = BinaryPlugin()
    config = _config(refnpu_stack.spec, mlp_path, compile={"opt_level": 2})
    store = ArtifactStore(tmp_path / "store")
    artifacts = build_all(plugin, [CPU], config, store)
    engine = artifacts["engine"]
    assert not engine.metadata["hit"]
    assert engine.file("model.rnpu").read_bytes()[:8] == b"RNPUENG1"
    assert json.loads(engine.file("io.json").read_text()) == {"input_dim": 12, "output_dim": 5}
    assert build_all(plugin, [CPU], config, store)["engine"].metadata["hit"]

    capability = plugin.get_capability([CPU], config, artifacts)
    assert capability.max_batch_size == 8
    assert "chat" in capability.unsupported
    assert "resources" not in capability.unsupported
    assert "resources" in plugin.get_capability([GPU], config, artifacts).unsupported

    rng = np.random.default_rng(3)
    batch = rng.standard_normal((21, 12)).astype(np.float32)  # more than max_batch_size: split in 3

    async def scenario() -> None:
        session = await plugin.create_session([CPU], config, artifacts)
        assert isinstance(session, BinarySession)
        assert session.batch_mode == BatchMode.NATIVE
        async with session:
            out = await session.run(batch)
            assert out.shape == (21, 5)
            assert np.max(np.abs(out - mlp_forward(mlp_layers, batch))) < 1e-4
            single = await session.run(batch[0].astype(np.float64))
            assert single.shape == (5,)
            assert np.allclose(single, out[0], atol=1e-6)
            outs = await asyncio.gather(*(session.run(batch[i : i + 2]) for i in range(0, 20, 2)))
            assert np.allclose(np.concatenate(outs), out[:20], atol=1e-6)
            with pytest.raises(ConfigError, match="rows of 12 values") as info:
                await session.run(np.zeros((2, 3), dtype=np.float32))
            assert info.value.field == "inputs"
        with pytest.raises(SessionError, match="closed"):
            await session.run(batch)

    asyncio.run(scenario())


@pytest.mark.slow
def test_corrupt_engine_fails_session_start_and_releases_everything(
    refnpu_stack: ReferenceStack, mlp_path: Path, tmp_path: Path
) -> None:
    plugin = BinaryPlugin()
    config = _config(refnpu_stack.spec, mlp_path)
    (profile,) = plugin.required_build_profiles([CPU], config)
    out = tmp_path / "artifact"
    out.mkdir()
    metadata = plugin.build(profile, config, out)
    assert metadata["input_dim"] == 12
    assert metadata["compiler_argv"][0] == str(refnpu_stack.compiler)
    engine = out / "model.rnpu"
    data = bytearray(engine.read_bytes())
    data[100] ^= 0x55
    engine.write_bytes(bytes(data))
    artifact = BuildArtifact(id="x", model_id="mlp", profile=profile, path=out)
    threads_before = threading.active_count()
    with pytest.raises(VendorRuntimeError) as info:
        asyncio.run(plugin.create_session([CPU], config, {"engine": artifact}))
    assert info.value.code == -5
    assert info.value.name == "REFNPU_E_CHECKSUM"
    assert threading.active_count() == threads_before  # the session's runner thread was stopped


@pytest.mark.slow
def test_stale_profile_and_missing_artifact_are_build_errors(
    refnpu_stack: ReferenceStack, mlp_path: Path, tmp_path: Path
) -> None:
    plugin = BinaryPlugin()
    (profile,) = plugin.required_build_profiles([CPU], _config(refnpu_stack.spec, mlp_path))
    with pytest.raises(BuildError, match="no longer matches"):
        plugin.build(profile, _config(refnpu_stack.spec, mlp_path, compile={"opt_level": 0}), tmp_path / "o")
    with pytest.raises(BuildError, match="build it first"):
        asyncio.run(plugin.create_session([CPU], _config(refnpu_stack.spec, mlp_path), {}))
    artifacts = build_all(plugin, [CPU], _config(refnpu_stack.spec, mlp_path), ArtifactStore(tmp_path / "s"))
    with pytest.raises(CapabilityError, match="not cuda:0") as info:
        asyncio.run(plugin.create_session([GPU], _config(refnpu_stack.spec, mlp_path), artifacts))
    assert info.value.reasons


@pytest.mark.slow
def test_reference_spec_builds_the_stack_into_the_cache(
    mlp_path: Path, tmp_path: Path, refnpu_stack: Any
) -> None:
    plugin = BinaryPlugin(reference_dir=tmp_path / "cache")
    config = ModelConfig(model_id="mlp", path=mlp_path, task="tensor")  # no options.spec: the reference
    spec_file = plugin.spec_file(config)
    assert spec_file.path.is_relative_to(tmp_path / "cache")
    assert spec_file.executable() is not None
    (profile,) = plugin.required_build_profiles([CPU], config)
    assert profile.compiler_version == "1.0.0"
