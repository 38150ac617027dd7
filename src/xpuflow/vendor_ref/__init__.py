"""The reference vendor stack: a small NPU SDK written in C, so the binary-stack path is tested for real.

It ships the way vendors ship: a compiler CLI (``refnpu-compile``) and a runtime library
(``librefnpu_runtime.so``) with a C API, plus a spec file that tells xpuflow's ``binary`` backend how to
drive them. The "NPU" is emulated on the host CPU: the runtime computes the network in C.
``export_mlp`` writes the model format the compiler reads::

    stack = build_reference_stack(tmp_dir)
    export_mlp([(w1, b1), (w2, b2)], tmp_dir / "mlp.xpfmlp")
"""

from xpuflow.vendor_ref.build import ReferenceStack, build_reference_stack, find_c_compiler, reference_stack
from xpuflow.vendor_ref.export import MlpInfo, export_mlp, mlp_forward, read_mlp, read_mlp_info

__all__ = [
    "MlpInfo",
    "ReferenceStack",
    "build_reference_stack",
    "export_mlp",
    "find_c_compiler",
    "mlp_forward",
    "read_mlp",
    "read_mlp_info",
    "reference_stack",
]
