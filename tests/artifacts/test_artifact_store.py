"""The artifact store: content keys, build-once, locking across processes, atomicity, corruption, gc."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpuflow.artifacts.profile import BuildInterface, BuildProfile
from xpuflow.artifacts.store import ArtifactStore, default_store_root
from xpuflow.errors import BuildError, CompilerError, ConfigError
from xpuflow.types import ResourceType

WORKER = Path(__file__).with_name("store_worker.py")
DIGEST = "a" * 64
PROFILE = BuildProfile(
    name="engine",
    target=ResourceType.NPU,
    compiler="refnpu-compile",
    compiler_version="1.0",
    flags=("--opt", "2"),
    interface=BuildInterface.CLI,
    backend="binary",
)


class CountingBuild:
    """A build function that writes ``files`` and counts its calls."""

    def __init__(self, files: Mapping[str, bytes] | None = None, info: Mapping[str, Any] | None = None):
        self.files = dict(files or {"engine.bin": b"\x7fENGINE" * 100, "meta/params.json": b'{"n": 1}'})
        self.info = info
        self.calls = 0

    def __call__(self, out_dir: Path) -> Mapping[str, Any] | None:
        self.calls += 1
        for name, data in self.files.items():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(data)
        return self.info


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def leftovers(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in store.tmp_dir.iterdir()) if store.tmp_dir.exists() else []


def corrupt(path: Path, data: bytes) -> None:
    path.chmod(0o644)  # artifact files are read-only
    path.write_bytes(data)


# -- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"name": "engine2"},
        {"backend": "other"},
        {"target": ResourceType.GPU},
        {"compiler": "othercc"},
        {"compiler_version": "1.1"},
        {"flags": ("--opt", "3")},
        {"flags": ("2", "--opt")},
        {"interface": BuildInterface.C_API},
    ],
)
def test_key_changes_with_every_profile_field(change: dict[str, Any]) -> None:
    assert ArtifactStore.key(DIGEST, dataclasses.replace(PROFILE, **change)) != ArtifactStore.key(
        DIGEST, PROFILE
    )


def test_key_changes_with_the_model_and_is_stable_otherwise() -> None:
    key = ArtifactStore.key(DIGEST, PROFILE)
    assert len(key) == 64
    assert ArtifactStore.key("b" * 64, PROFILE) != key
    assert ArtifactStore.key(DIGEST, dataclasses.replace(PROFILE)) == key
    # the description is documentation, not an input of the build
    assert ArtifactStore.key(DIGEST, dataclasses.replace(PROFILE, description="fast engine")) == key


# -- build once, hit after ----------------------------------------------------------------------------


def test_get_or_build_builds_once_then_hits(store: ArtifactStore) -> None:
    build = CountingBuild(info={"entry": "engine.bin"})
    assert store.get(DIGEST, PROFILE) is None
    built = store.get_or_build("chat-small", DIGEST, PROFILE, build)
    assert build.calls == 1
    assert built.metadata["hit"] is False
    hit = store.get_or_build("chat-small", DIGEST, PROFILE, build)
    assert build.calls == 1
    assert hit.metadata["hit"] is True
    assert hit.id == built.id == ArtifactStore.key(DIGEST, PROFILE)
    assert hit.path == store.root / "objects" / hit.id[:2] / hit.id
    assert hit.profile == PROFILE
    assert hit.model_id == "chat-small"
    assert hit.file("meta/params.json").read_bytes() == b'{"n": 1}'
    assert hit.metadata["info"] == {"entry": "engine.bin"}
    assert hit.metadata["sizes"] == {"engine.bin": 700, "meta/params.json": 8}
    assert hit.metadata["total_bytes"] == 708
    assert set(hit.metadata["sha256"]) == {"engine.bin", "meta/params.json"}
    assert hit.metadata["build_s"] >= 0
    assert hit.metadata["created_at"] <= time.time()
    assert hit.file("engine.bin").stat().st_mode & 0o222 == 0  # artifacts are immutable
    manifest = json.loads((hit.path / "manifest.json").read_text())
    assert manifest["profile"] == PROFILE.to_dict()
    assert manifest["files"]["engine.bin"]["size_bytes"] == 700
    assert leftovers(store) == []


def test_a_hit_costs_a_few_milliseconds(store: ArtifactStore) -> None:
    store.get_or_build("m", DIGEST, PROFILE, CountingBuild())
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        assert store.get(DIGEST, PROFILE) is not None
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[len(timings) // 2] < 5e-3, timings


def test_default_root_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XPUFLOW_CACHE_DIR", str(tmp_path / "env"))
    assert ArtifactStore().root == tmp_path / "env"
    monkeypatch.delenv("XPUFLOW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_root() == tmp_path / "xdg" / "xpuflow" / "artifacts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_root() == tmp_path / "home" / ".cache" / "xpuflow" / "artifacts"
    assert ArtifactStore(tmp_path / "explicit").root == tmp_path / "explicit"


# -- failures leave nothing behind --------------------------------------------------------------------


def test_a_failing_build_leaves_nothing_and_raises_build_error(store: ArtifactStore) -> None:
    def build(out_dir: Path) -> None:
        (out_dir / "half.bin").write_bytes(b"half")
        raise ValueError("compiler ran out of memory")

    with pytest.raises(BuildError, match="compiler ran out of memory") as info:
        store.get_or_build("m", DIGEST, PROFILE, build)
    assert isinstance(info.value.__cause__, ValueError)
    assert store.get(DIGEST, PROFILE) is None
    assert store.list() == []
    assert leftovers(store) == []


def test_xpuflow_errors_pass_through_unwrapped(store: ArtifactStore) -> None:
    def build(out_dir: Path) -> None:
        raise CompilerError("refnpu-compile exited 1", returncode=1, stderr="bad layer")

    with pytest.raises(CompilerError) as info:
        store.get_or_build("m", DIGEST, PROFILE, build)
    assert info.value.stderr == "bad layer"
    assert leftovers(store) == []


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda out: None, "wrote no files"),
        (lambda out: (out / "sub").mkdir(), "wrote no files"),
        (lambda out: (out / "manifest.json").write_text("{}"), "may not write 'manifest.json'"),
        (lambda out: (out / "link").symlink_to("/etc/hostname"), "symlink"),
        (lambda out: (out / "a").write_text("a") and {"when": object()}, "not JSON"),
    ],
)
def test_bad_outputs_are_refused(store: ArtifactStore, build: Callable[[Path], Any], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        store.get_or_build("m", DIGEST, PROFILE, build)
    assert store.list() == []
    assert leftovers(store) == []


def test_a_build_killed_mid_way_leaves_no_half_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "go").write_text("")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(store.root), str(work), "a", "crash"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert len(leftovers(store)) == 1  # the dead build's folder, never renamed into place
    profile = BuildProfile(name="engine", target=ResourceType.CPU, compiler="cc", compiler_version="1.0")
    assert store.get("d" * 64, profile) is None
    assert store.list() == []
    build = CountingBuild()
    assert store.get_or_build("m", "d" * 64, profile, build).metadata["hit"] is False
    assert build.calls == 1
    store.gc()
    assert leftovers(store) == []


# -- concurrency --------------------------------------------------------------------------------------


def test_two_processes_racing_build_exactly_once(store: ArtifactStore, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(store.root), str(work), name, "build"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((work / f"ready-{n}").exists() for n in ("a", "b")):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (work / "go").write_text("")
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    assert (work / "calls").read_text().count("\n") == 1
    assert results[0]["id"] == results[1]["id"]
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["hit"] for r in results) == [False, True]
    assert len(store.list()) == 1
    assert leftovers(store) == []


def test_threads_racing_build_exactly_once(store: ArtifactStore) -> None:
    lock = threading.Lock()
    calls = []

    def build(out_dir: Path) -> None:
        with lock:
            calls.append(threading.get_ident())
        time.sleep(0.2)
        (out_dir / "engine.bin").write_bytes(b"x" * 1000)

    barrier = threading.Barrier(4)
    ids: list[str] = []

    def worker() -> None:
        barrier.wait()
        ids.append(store.get_or_build("m", DIGEST, PROFILE, build).id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1
    assert len(ids) == 4
    assert len(set(ids)) == 1


# -- corruption ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda a: corrupt(a.file("engine.bin"), b"\x7fENGINF" + b"\x7fENGINE" * 99),  # same size
        lambda a: corrupt(a.file("engine.bin"), b"short"),
        lambda a: a.file("meta/params.json").unlink(),
        lambda a: corrupt(a.path / "manifest.json", b'{"format": 1, "key": '),
        lambda a: (a.path / "manifest.json").unlink(),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "broken-manifest", "missing-manifest"],
)
def test_a_corrupt_artifact_is_never_used_and_is_rebuilt(
    store: ArtifactStore, damage: Callable[[Any], None], caplog: pytest.LogCaptureFixture
) -> None:
    build = CountingBuild()
    artifact = store.get_or_build("m", DIGEST, PROFILE, build)
    damage(artifact)
    with caplog.at_level(logging.WARNING, logger="xpuflow.artifacts.store"):
        assert store.get(DIGEST, PROFILE) is None
    assert "corrupt" in caplog.text
    assert not artifact.path.exists()  # removed, so nothing can pick it up
    rebuilt = store.get_or_build("m", DIGEST, PROFILE, build)
    assert build.calls == 2
    assert rebuilt.metadata["hit"] is False
    assert rebuilt.file("engine.bin").read_bytes() == build.files["engine.bin"]
    assert leftovers(store) == []


def test_get_or_build_rebuilds_a_corrupt_artifact_directly(store: ArtifactStore) -> None:
    build = CountingBuild()
    artifact = store.get_or_build("m", DIGEST, PROFILE, build)
    corrupt(artifact.file("engine.bin"), b"x" * 700)
    assert store.get_or_build("m", DIGEST, PROFILE, build).metadata["hit"] is False
    assert build.calls == 2


# -- listing, removal, gc -----------------------------------------------------------------------------


def build_aged(store: ArtifactStore, name: str, size: int, last_used_ago_s: float) -> str:
    profile = dataclasses.replace(PROFILE, name=name)
    artifact = store.get_or_build(name, DIGEST, profile, CountingBuild({"out.bin": b"x" * size}))
    when = time.time() - last_used_ago_s
    os.utime(artifact.path / "manifest.json", (when, when))
    return artifact.id


def test_list_total_bytes_and_remove(store: ArtifactStore) -> None:
    assert store.list() == []
    assert store.total_bytes() == 0
    old = build_aged(store, "old", 100, 3600)
    new = build_aged(store, "new", 50, 10)
    assert [a.id for a in store.list()] == [new, old]  # most recently used first
    assert store.total_bytes() == 150
    store.remove(old)
    assert [a.id for a in store.list()] == [new]
    with pytest.raises(ConfigError, match="no artifact"):
        store.remove(old)
    with pytest.raises(ConfigError, match="artifacts ls"):
        store.remove("not-an-id")


def test_a_hit_refreshes_last_use(store: ArtifactStore) -> None:
    key = build_aged(store, "engine", 10, 7200)
    before = store.list()[0].metadata["last_used"]
    store.get(DIGEST, PROFILE)
    after = next(a for a in store.list() if a.id == key).metadata["last_used"]
    assert after > before + 3000


def test_gc_by_age(store: ArtifactStore) -> None:
    old = build_aged(store, "old", 100, 10 * 86400)
    new = build_aged(store, "new", 100, 60)
    assert [a.id for a in store.gc(older_than_s=86400, dry_run=True)] == [old]
    assert len(store.list()) == 2  # a dry run removes nothing
    assert [a.id for a in store.gc(older_than_s=86400)] == [old]
    assert [a.id for a in store.list()] == [new]


def test_gc_by_size_removes_least_recently_used_first(store: ArtifactStore) -> None:
    a = build_aged(store, "a", 100, 300)
    b = build_aged(store, "b", 100, 200)
    c = build_aged(store, "c", 100, 100)
    assert [x.id for x in store.gc(max_total_bytes=250)] == [a]
    assert [x.id for x in store.gc(max_total_bytes=100)] == [b]
    assert [x.id for x in store.list()] == [c]
    assert store.gc(max_total_bytes=100) == []
    assert [x.id for x in store.gc(max_total_bytes=0)] == [c]
    assert store.total_bytes() == 0


def test_gc_sweeps_leftovers_but_not_running_builds(store: ArtifactStore) -> None:
    key = build_aged(store, "kept", 10, 0)
    orphan = ArtifactStore.key("e" * 64, PROFILE)
    (store.tmp_dir / f"{orphan}.123.abcd").mkdir(parents=True)  # a crashed build
    (store.tmp_dir / f"{orphan}.123.abcd" / "half.bin").write_bytes(b"x")
    (store.locks_dir / f"{orphan}.lock").write_text("")
    no_manifest = store.objects_dir / "ff" / ("f" * 64)
    no_manifest.mkdir(parents=True)
    running = ArtifactStore.key("c" * 64, PROFILE)
    seen_during_build: list[list[str]] = []

    def slow_build(out_dir: Path) -> None:
        store.gc()  # another process collecting garbage while this build runs
        seen_during_build.append(leftovers(store))
        (out_dir / "x.bin").write_bytes(b"x")

    store.get_or_build("m", "c" * 64, PROFILE, slow_build)
    assert len(seen_during_build[0]) == 1
    assert seen_during_build[0][0].startswith(running)  # the running build's folder was left alone
    assert leftovers(store) == []
    assert not no_manifest.exists()
    assert not (store.locks_dir / f"{orphan}.lock").exists()
    assert {a.id for a in store.list()} == {key, running}


def test_a_lock_file_removed_by_gc_is_recreated(store: ArtifactStore) -> None:
    build = CountingBuild()
    store.get_or_build("m", DIGEST, PROFILE, build)
    key = ArtifactStore.key(DIGEST, PROFILE)
    store.remove(key)
    store.gc()
    assert not (store.locks_dir / f"{key}.lock").exists()
    store.get_or_build("m", DIGEST, PROFILE, build)
    assert build.calls == 2


# -- property: what comes back is exactly what was built ----------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
paths = st.lists(names, min_size=1, max_size=3).map("/".join).filter(lambda p: p != "manifest.json")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.dictionaries(paths, st.binary(max_size=4096), min_size=1, max_size=5).filter(
        # a name cannot be both a file and a folder
        lambda files: not any(a != b and b.startswith(a + "/") for a in files for b in files)
    )
)
def test_get_returns_exactly_the_built_bytes(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        store.get_or_build("m", DIGEST, PROFILE, CountingBuild(files))
        artifact = store.get(DIGEST, PROFILE)
        assert artifact is not None
        assert set(artifact.metadata["sizes"]) == set(files)
        for name, data in files.items():
            assert artifact.file(name).read_bytes() == data


def test_a_tampered_manifest_cannot_point_outside_the_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    artifact = store.get_or_build("m", DIGEST, PROFILE, CountingBuild())
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    manifest_path = artifact.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {"../../../../outside.bin": {"sha256": "0" * 64, "size_bytes": 6}}
    corrupt(manifest_path, json.dumps(manifest).encode())
    assert store.list() == []  # listed artifacts always have sane manifests
    assert store.get(DIGEST, PROFILE) is None
    assert outside.read_bytes() == b"secret"
    assert not artifact.path.exists()


def test_leftovers_lists_crashed_builds_and_removes_them_only_when_asked(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    work = store.tmp_dir / f"{'c' * 64}.99.feedface"
    work.mkdir(parents=True)
    (work / "half.bin").write_bytes(b"x" * 100)
    trash = store.tmp_dir / f"{'d' * 64}.trash-0011aabb"
    trash.mkdir()
    [crashed, deleted] = store.leftovers()
    assert (crashed.path, crashed.size_bytes, crashed.reason) == (work, 100, "crashed build")
    assert (deleted.path, deleted.reason) == (trash, "interrupted deletion")
    assert work.exists()
    assert trash.exists()
    assert [x.path for x in store.leftovers(remove=True)] == [work, trash]
    assert leftovers(store) == []
    assert store.leftovers() == []


def test_leftovers_skip_a_build_in_progress(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    key = "e" * 64
    work = store.tmp_dir / f"{key}.1.00000000"
    work.mkdir(parents=True)
    with store._lock(key):  # a live build of this key holds its lock
        assert store.leftovers(remove=True) == []
    assert work.exists()
