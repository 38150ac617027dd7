"""Serve a small MLP on a binary-only NPU stack: the xpuflow reference stack, built from C here.

The steps are the ones a vendor NPU takes in production:

1. build the vendor stack (here: compile refnpu-compile and librefnpu_runtime.so with the host cc);
2. export the model in xpuflow's MLP format;
3. compile it into an engine through the ``binary`` backend and the artifact store (a second run
   reuses the cached engine);
4. open a session on the device (the reference "NPU" is emulated on the host CPU) and run a batch.

Run it with ``python examples/binary_npu/run.py``; the last line is ``max_abs_err=<value>`` against
numpy.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
from pathlib import Path

import numpy as np

from xpuflow.artifacts.builder import build_all
from xpuflow.artifacts.store import ArtifactStore
from xpuflow.backends.base import ModelConfig
from xpuflow.backends.binary.plugin import BinaryPlugin
from xpuflow.types import Resource, ResourceType
from xpuflow.vendor_ref import build_reference_stack, export_mlp, mlp_forward


def random_mlp(rng: np.random.Generator, widths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised dense layers, float32."""
    return [
        (
            (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32),
            (rng.standard_normal(n_out) * 0.1).astype(np.float32),
        )
        for n_in, n_out in itertools.pairwise(widths)
    ]


async def main(work_dir: Path, batch_size: int, opt_level: int) -> float:
    stack = build_reference_stack(work_dir / "refnpu")
    print(f"vendor stack: {stack.compiler.name}, {stack.library.name} in {stack.root}")

    rng = np.random.default_rng(1234)
    layers = random_mlp(rng, [64, 128, 64, 10])
    model_path = work_dir / "mlp.xpfmlp"
    info = export_mlp(layers, model_path)
    print(f"exported MLP: {info.input_dim} -> {info.output_dim}, {info.num_parameters} parameters")

    plugin = BinaryPlugin()
    cpu = Resource(id="cpu", type=ResourceType.CPU, name="host CPU")
    resources = plugin.probe([cpu])  # the reference NPU runs on the host CPU
    config = ModelConfig(
        model_id="mlp-npu",
        path=model_path,
        task="tensor",
        max_batch_size=batch_size,
        options={"spec": str(stack.spec), "compile": {"opt_level": opt_level}},
    )
    store = ArtifactStore(work_dir / "artifacts")
    artifacts = build_all(plugin, resources, config, store)
    engine = artifacts["engine"]
    state = "cached" if engine.metadata.get("hit") else "built"
    print(f"engine {state}: {engine.path} ({engine.profile.compiler} {engine.profile.compiler_version})")

    inputs = rng.standard_normal((batch_size, info.input_dim)).astype(np.float32)
    async with await plugin.create_session(resources, config, artifacts) as session:
        outputs = await session.run(inputs)
    expected = mlp_forward(layers, inputs)
    max_abs_err = float(np.max(np.abs(outputs - expected)))
    print(f"ran a batch of {batch_size} on {resources[0].id}: output {outputs.shape}")
    return max_abs_err


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="keep the stack, model and artifacts here")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--opt-level", type=int, default=2, choices=(0, 1, 2))
    args = parser.parse_args()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        err = asyncio.run(main(args.work_dir, args.batch_size, args.opt_level))
    else:
        with tempfile.TemporaryDirectory(prefix="xpuflow-binary-npu-") as tmp:
            err = asyncio.run(main(Path(tmp), args.batch_size, args.opt_level))
    print(f"max_abs_err={err:.3g}")
