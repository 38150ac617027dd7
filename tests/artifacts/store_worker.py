"""A separate process that builds one artifact; the store tests race two of these, or kill one mid-build.

    python store_worker.py ROOT WORKDIR NAME MODE      MODE: build | crash

It writes WORKDIR/ready-NAME once imported, waits for WORKDIR/go, calls get_or_build, appends its pid to
WORKDIR/calls for every build it runs, and prints the artifact as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from xpuflow.artifacts.profile import BuildProfile
from xpuflow.artifacts.store import ArtifactStore
from xpuflow.types import ResourceType

PROFILE = BuildProfile(name="engine", target=ResourceType.CPU, compiler="cc", compiler_version="1.0")
MODEL_DIGEST = "d" * 64


def main() -> None:
    root, work, name, mode = sys.argv[1:5]
    workdir = Path(work)

    def build(out_dir: Path) -> dict[str, str]:
        with open(workdir / "calls", "a", encoding="utf-8") as calls:
            calls.write(f"{os.getpid()}\n")
        (out_dir / "engine.bin").write_bytes(b"engine" * 10_000)
        if mode == "crash":
            os._exit(3)  # killed half-way: the output exists but no manifest, no rename
        time.sleep(0.5)  # long enough that the other process surely tries meanwhile
        return {"built_by": name}

    (workdir / f"ready-{name}").write_text("")
    deadline = time.monotonic() + 60
    while not (workdir / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("never got the go signal")
        time.sleep(0.002)
    artifact = ArtifactStore(root).get_or_build("m", MODEL_DIGEST, PROFILE, build)
    print(json.dumps({"id": artifact.id, "path": str(artifact.path), "hit": artifact.metadata["hit"]}))


if __name__ == "__main__":
    main()
