"""The content-addressed artifact store: every build output, keyed by what went into it.

    store = ArtifactStore()                       # $XPUFLOW_CACHE_DIR, else ~/.cache/xpuflow/artifacts
    artifact = store.get_or_build("chat-small", model_digest(path), profile, build)
    artifact.file("engine.bin")                   # checksummed, immutable
    store.gc(max_total_bytes=20 << 30)

Layout under the root::

    objects/<key[:2]>/<key>/    one artifact: the build's output files plus manifest.json
    locks/<key>.lock            flock'ed while the artifact is built or removed
    tmp/<key>.<random>/         builds in progress (and artifacts being deleted)
    digests.json                the model digest cache (see ``digest.py``)

The key is the sha256 of canonical JSON of the model digest and the profile's key fields, so a new
compiler version, flag or model builds a new artifact and never reuses a stale one. A build runs in
``tmp/`` on the same filesystem and becomes visible with one atomic ``rename``: readers see a whole
artifact or none. Every hit verifies every file's sha256 against the manifest; a corrupt artifact is
logged, removed and rebuilt, never used. Locks are ``flock`` locks, so they work between processes and
between threads (each acquisition opens its own file description), and die with their holder.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpuflow.artifacts.digest import digest_text, file_sha256
from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.errors import ArtifactCorrupt, BuildError, ConfigError, XpuflowError

if TYPE_CHECKING:
    from xpuflow.artifacts.builder import BuildProgress

__all__ = ["CACHE_DIR_ENV", "MANIFEST_NAME", "ArtifactStore", "Leftover", "default_store_root"]

log = logging.getLogger(__name__)

#: Environment variable naming the artifact store's root folder.
CACHE_DIR_ENV = "XPUFLOW_CACHE_DIR"

#: The file in every artifact that lists its files and checksums; a build may not write a file so named.
MANIFEST_NAME = "manifest.json"

_MANIFEST_FORMAT = 1
_KEY_LENGTH = 64

#: A hit refreshes the artifact's last-use time at most this often, so read-mostly stores see few writes.
_TOUCH_INTERVAL_S = 60.0


def default_store_root() -> Path:
    """``$XPUFLOW_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/xpuflow/artifacts`` (``~/.cache`` by default).
    Read at call time, so a process may change the environment before it opens a store."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home).expanduser() / "xpuflow" / "artifacts"


def _is_key(name: str) -> bool:
    return len(name) == _KEY_LENGTH and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class Leftover:
    """A folder ``gc`` removes that is not an artifact: a crashed build or an interrupted deletion in
    ``tmp/``, or an artifact folder without a valid manifest. ``size_bytes`` is what its files hold."""

    path: Path
    size_bytes: int
    reason: str


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _profile_from_dict(data: Mapping[str, Any]) -> BuildProfile:
    return BuildProfile(
        name=data["name"],
        target=data["target"],
        compiler=data["compiler"],
        compiler_version=data["compiler_version"],
        flags=tuple(data.get("flags", ())),
        interface=data.get("interface", "python"),
        backend=data.get("backend", ""),
        description=data.get("description", ""),
    )


def _output_files(out_dir: Path) -> dict[str, Path]:
    """The build's regular files by relative POSIX name. Symlinks are refused: what they point at could
    change after the checksum was taken."""
    files: dict[str, Path] = {}
    for current, dirnames, filenames in os.walk(out_dir):
        base = Path(current)
        for name in [*dirnames, *filenames]:
            path = base / name
            if path.is_symlink():
                raise BuildError(
                    f"build output {path.relative_to(out_dir)} is a symlink; builds must write regular "
                    "files (copy the target instead)"
                )
        for name in filenames:
            path = base / name
            files[path.relative_to(out_dir).as_posix()] = path
    if MANIFEST_NAME in files:
        raise BuildError(f"a build may not write '{MANIFEST_NAME}': the store keeps its checksums there")
    return dict(sorted(files.items()))


class ArtifactStore:
    """Content-addressed, checksummed, concurrency-safe storage of build outputs.

    ``root`` defaults to ``default_store_root()``. Safe to share between processes and threads on one
    machine; locks are advisory ``flock`` locks (local filesystems; NFS only where it supports flock).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_root()
        self.objects_dir = self.root / "objects"
        self.locks_dir = self.root / "locks"
        self.tmp_dir = self.root / "tmp"
        self.digest_index_path = self.root / "digests.json"

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    # -- keys and paths ---------------------------------------------------------------------------------

    @staticmethod
    def key(model_digest: str, profile: BuildProfile) -> str:
        """sha256 (hex) of canonical JSON of the model digest and ``profile.key_fields()``."""
        payload = {"model_digest": model_digest, "profile": profile.key_fields()}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return digest_text(canonical)

    def _object_dir(self, key: str) -> Path:
        return self.objects_dir / key[:2] / key

    # -- lookup -----------------------------------------------------------------------------------------

    def get(self, model_digest: str, profile: BuildProfile) -> BuildArtifact | None:
        """The verified artifact for this model and profile, or None when there is none or it was corrupt
        (a corrupt artifact is logged and removed, so the next ``get_or_build`` rebuilds it)."""
        return self._lookup(self.key(model_digest, profile), locked=False)

    def _lookup(self, key: str, *, locked: bool) -> BuildArtifact | None:
        start = time.perf_counter()
        directory = self._object_dir(key)
        try:
            dir_stat = os.stat(directory)
        except FileNotFoundError:
            return None
        try:
            manifest, manifest_stat = self._read_manifest(directory, key)
            self._verify(directory, manifest)
        except ArtifactCorrupt as exc:
            if not directory.exists():
                return None  # removed (gc, another process) while we read it: a plain miss
            log.warning("artifact %s is corrupt (%s); removing it so that it is rebuilt", key, exc)
            self._discard(key, dir_stat, locked=locked)
            return None
        if time.time() - manifest_stat.st_mtime > _TOUCH_INTERVAL_S:
            with contextlib.suppress(OSError):  # a read-only store still serves hits
                os.utime(directory / MANIFEST_NAME)
        return self._artifact(
            directory, manifest, last_used=time.time(), hit=True, elapsed_s=time.perf_counter() - start
        )

    def _read_manifest(self, directory: Path, key: str) -> tuple[dict[str, Any], os.stat_result]:
        try:
            with open(directory / MANIFEST_NAME, "rb") as file:
                manifest_stat = os.fstat(file.fileno())
                manifest = json.loads(file.read())
        except FileNotFoundError as exc:
            raise ArtifactCorrupt("manifest.json is missing") from exc
        except (OSError, ValueError) as exc:
            raise ArtifactCorrupt(f"manifest.json is unreadable: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
            raise ArtifactCorrupt("manifest.json has an unknown format")
        if manifest.get("key") != key:
            raise ArtifactCorrupt("manifest.json belongs to another key")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise ArtifactCorrupt("manifest.json lists no files")
        for name, entry in files.items():
            parts = name.split("/")
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size_bytes"), int)
                or name in ("", MANIFEST_NAME)
                or name.startswith("/")
                or any(part in ("", ".", "..") for part in parts)
            ):
                raise ArtifactCorrupt(f"manifest.json has an invalid entry for {name!r}")
        try:
            _profile_from_dict(manifest["profile"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactCorrupt(f"manifest.json has an invalid profile: {exc}") from exc
        return manifest, manifest_stat

    @staticmethod
    def _verify(directory: Path, manifest: Mapping[str, Any]) -> None:
        for name, entry in manifest["files"].items():
            path = directory / name
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    raise ArtifactCorrupt(f"{name} is not a regular file")
                if st.st_size != entry["size_bytes"]:
                    raise ArtifactCorrupt(
                        f"{name} has {st.st_size} bytes, the manifest says {entry['size_bytes']}"
                    )
                if file_sha256(path) != entry["sha256"]:
                    raise ArtifactCorrupt(f"{name} does not match its sha256")
            except FileNotFoundError as exc:
                raise ArtifactCorrupt(f"{name} is missing") from exc
            except ArtifactCorrupt:
                raise
            except OSError as exc:
                raise ArtifactCorrupt(f"{name} is unreadable: {exc}") from exc

    def _artifact(
        self, directory: Path, manifest: Mapping[str, Any], *, last_used: float, **extra: Any
    ) -> BuildArtifact:
        files = manifest["files"]
        metadata = {
            "sha256": {name: entry["sha256"] for name, entry in files.items()},
            "sizes": {name: entry["size_bytes"] for name, entry in files.items()},
            "total_bytes": sum(entry["size_bytes"] for entry in files.values()),
            "model_digest": manifest.get("model_digest"),
            "created_at": manifest.get("created_at"),
            "build_s": manifest.get("build_s"),
            "last_used": last_used,
            "info": manifest.get("info") or {},
            **extra,
        }
        return BuildArtifact(
            id=manifest["key"],
            model_id=manifest.get("model_id", ""),
            profile=_profile_from_dict(manifest["profile"]),
            path=directory,
            metadata=metadata,
        )

    # -- building ---------------------------------------------------------------------------------------

    def get_or_build(
        self,
        model_id: str,
        model_digest: str,
        profile: BuildProfile,
        build: Callable[[Path], Mapping[str, Any] | None],
        *,
        progress: BuildProgress | None = None,
    ) -> BuildArtifact:
        """The artifact for this model and profile, building it with ``build(out_dir)`` on a miss.

        ``build`` writes at least one file into the empty folder it is given and may return a
        JSON-serialisable mapping, kept as ``metadata["info"]``. Concurrent callers, in this process or
        others, build a key once: the others wait on its lock and then hit. A failing build leaves
        nothing behind and raises BuildError (from the original exception; XpuflowErrors pass through).
        ``metadata["hit"]`` says whether it was found, ``metadata["elapsed_s"]`` what this call took.
        """
        key = self.key(model_digest, profile)
        found = self._lookup(key, locked=False)
        if found is not None:
            return found
        label = f"{model_id}/{profile.name}"
        start = time.perf_counter()
        with self._lock(key, waiting_for=label):
            found = self._lookup(key, locked=True)  # another process may have built it while we waited
            if found is not None:
                return found
            if progress is not None:
                progress.start(f"build {label}", None)
            try:
                artifact = self._build_locked(
                    key=key,
                    model_id=model_id,
                    model_digest=model_digest,
                    profile=profile,
                    build=build,
                    start=start,
                )
            except BaseException:
                if progress is not None:
                    progress.finish(f"build {label}", "failed")
                raise
        if progress is not None:
            progress.finish(f"build {label}", f"built in {artifact.metadata['build_s']:.1f} s")
        return artifact

    def _build_locked(
        self,
        *,
        key: str,
        model_id: str,
        model_digest: str,
        profile: BuildProfile,
        build: Callable[[Path], Mapping[str, Any] | None],
        start: float,
    ) -> BuildArtifact:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        work = self.tmp_dir / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        work.mkdir()
        try:
            build_start = time.perf_counter()
            info = build(work)
            build_s = time.perf_counter() - build_start
            manifest = self._write_manifest(
                work=work,
                key=key,
                model_id=model_id,
                model_digest=model_digest,
                profile=profile,
                info=info,
                build_s=build_s,
            )
            final = self._object_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, final)  # atomic: readers see the whole artifact or nothing
            except OSError:
                # Only a filesystem that ignores flock lets two builders race here; keep theirs.
                existing = self._lookup(key, locked=True) if final.exists() else None
                if existing is None:
                    raise
                shutil.rmtree(work, ignore_errors=True)
                return existing
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, XpuflowError) or not isinstance(exc, Exception):
                raise
            raise BuildError(
                f"building '{profile.name}' for model '{model_id}' failed: {type(exc).__name__}: {exc}"
            ) from exc
        log.info("built artifact %s (%s) in %.2f s", key, f"{model_id}/{profile.name}", build_s)
        return self._artifact(
            final, manifest, last_used=time.time(), hit=False, elapsed_s=time.perf_counter() - start
        )

    def _write_manifest(
        self,
        *,
        work: Path,
        key: str,
        model_id: str,
        model_digest: str,
        profile: BuildProfile,
        info: Mapping[str, Any] | None,
        build_s: float,
    ) -> dict[str, Any]:
        files = _output_files(work)
        if not files:
            raise BuildError(
                f"building '{profile.name}' for model '{model_id}' wrote no files; a build must write at "
                "least one file into the folder it is given"
            )
        entries = {}
        for name, path in files.items():
            entries[name] = {"sha256": file_sha256(path), "size_bytes": path.stat().st_size}
            # artifacts are immutable: keep sessions from writing into them by accident
            path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
        manifest = {
            "format": _MANIFEST_FORMAT,
            "key": key,
            "model_id": model_id,
            "model_digest": model_digest,
            "profile": profile.to_dict(),
            "files": entries,
            "created_at": time.time(),
            "build_s": round(build_s, 6),
            "info": dict(info or {}),
        }
        try:
            text = json.dumps(manifest, indent=2, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise BuildError(
                f"building '{profile.name}' for model '{model_id}' returned metadata that is not JSON: {exc}"
            ) from exc
        (work / MANIFEST_NAME).write_text(text, encoding="utf-8")
        return manifest

    # -- locks ------------------------------------------------------------------------------------------

    def _try_lock(self, key: str, *, blocking: bool) -> int | None:
        """An fd holding the exclusive lock of ``key``, or None when not blocking and it is held."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        path = self.locks_dir / f"{key}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            # gc may have unlinked the lock file between our open and flock: then we locked an orphan
            # inode and must lock the file that is there now.
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                return fd
            os.close(fd)

    @contextlib.contextmanager
    def _lock(self, key: str, *, blocking: bool = True, waiting_for: str = "") -> Iterator[bool]:
        fd = self._try_lock(key, blocking=False)
        if fd is None and blocking:
            log.info("waiting for another process to finish %s", waiting_for or key)
            fd = self._try_lock(key, blocking=True)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)  # closing the last descriptor releases the flock

    # -- removal ----------------------------------------------------------------------------------------

    def _trash(self, directory: Path, key: str) -> None:
        """Move ``directory`` out of sight atomically, then delete it."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        trash = self.tmp_dir / f"{key}.trash-{secrets.token_hex(4)}"
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _discard(self, key: str, seen: os.stat_result, *, locked: bool) -> None:
        """Remove the corrupt artifact of ``key`` unless it was replaced since we looked at it."""
        with contextlib.ExitStack() as stack:
            if not locked and not stack.enter_context(self._lock(key, blocking=False)):
                return  # whoever holds the lock re-checks under it and replaces it
            directory = self._object_dir(key)
            try:
                now = os.stat(directory)
            except FileNotFoundError:
                return
            if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
                self._trash(directory, key)

    def remove(self, artifact_id: str) -> None:
        """Delete one artifact. Raises ConfigError when there is no artifact with this id."""
        directory = self._object_dir(artifact_id) if _is_key(artifact_id) else None
        if directory is None or not directory.exists():
            raise ConfigError(
                f"no artifact '{artifact_id}' in {self.root}; `xpuflow artifacts ls` lists them"
            )
        with self._lock(artifact_id):
            self._trash(directory, artifact_id)

    # -- listing and garbage collection -----------------------------------------------------------------

    def _object_dirs(self) -> Iterator[tuple[str, Path]]:
        if not self.objects_dir.is_dir():
            return
        for shard in sorted(self.objects_dir.iterdir()):
            if shard.is_dir():
                for directory in sorted(shard.iterdir()):
                    yield directory.name, directory

    def list(self) -> builtins.list[BuildArtifact]:
        """Every artifact, most recently used first. Reads manifests only (no checksums); ``metadata``
        has ``last_used`` (epoch seconds). Folders without a valid manifest are skipped (gc removes them)."""
        artifacts = []
        for key, directory in self._object_dirs():
            try:
                manifest, manifest_stat = self._read_manifest(directory, key)
            except ArtifactCorrupt as exc:
                log.warning("skipping %s: %s", directory, exc)
                continue
            artifacts.append(self._artifact(directory, manifest, last_used=manifest_stat.st_mtime))
        artifacts.sort(key=lambda a: a.metadata["last_used"], reverse=True)
        return artifacts

    def total_bytes(self) -> int:
        """The bytes of all artifacts' files, as their manifests record them."""
        return sum(int(a.metadata["total_bytes"]) for a in self.list())

    def gc(
        self,
        *,
        older_than_s: float | None = None,
        max_total_bytes: int | None = None,
        dry_run: bool = False,
    ) -> builtins.list[BuildArtifact]:
        """Remove artifacts unused for ``older_than_s``, then the least recently used until the store holds
        at most ``max_total_bytes``; returns what was (or, with ``dry_run``, would be) removed.

        Always also removes leftovers of crashed builds and deletions in ``tmp/`` and artifact folders
        without a valid manifest (unless ``dry_run``; ``leftovers()`` reports them, and is what to call
        first to show them). Artifacts whose lock is held are skipped.
        """
        if not dry_run:
            self.leftovers(remove=True)
        now = time.time()
        oldest_first = builtins.list(reversed(self.list()))
        chosen: builtins.list[BuildArtifact] = []
        remaining = sum(int(a.metadata["total_bytes"]) for a in oldest_first)
        for artifact in oldest_first:
            too_old = older_than_s is not None and now - artifact.metadata["last_used"] > older_than_s
            too_big = max_total_bytes is not None and remaining > max_total_bytes
            if too_old or too_big:
                chosen.append(artifact)
                remaining -= int(artifact.metadata["total_bytes"])
        if dry_run:
            return chosen
        removed = []
        for artifact in chosen:
            with self._lock(artifact.id, blocking=False) as acquired:
                if acquired:
                    self._trash(artifact.path, artifact.id)
                    removed.append(artifact)
                else:
                    log.info("gc skipped %s: it is being built or removed", artifact.id)
        return removed

    def leftovers(self, *, remove: bool = False) -> builtins.list[Leftover]:
        """The leftovers of crashed builds and deletions in ``tmp/`` and the artifact folders without a
        manifest, whose lock nobody holds (a held lock means a build or removal is running now). With
        ``remove`` they are deleted (and orphaned lock files with them) and the list says what was."""
        found: builtins.list[Leftover] = []
        if self.tmp_dir.is_dir():
            for entry in sorted(self.tmp_dir.iterdir()):
                key = entry.name.split(".", 1)[0]
                if not _is_key(key):
                    continue
                with self._lock(key, blocking=False) as acquired:
                    if acquired:  # no build of this key is running, so this is a crash's leftover
                        reason = "interrupted deletion" if ".trash-" in entry.name else "crashed build"
                        found.append(Leftover(entry, _tree_bytes(entry), reason))
                        if remove:
                            log.info("gc removing leftover %s", entry)
                            shutil.rmtree(entry, ignore_errors=True)
        for key, directory in builtins.list(self._object_dirs()):
            if not (directory / MANIFEST_NAME).is_file():
                with self._lock(key, blocking=False) as acquired:
                    if acquired and not (directory / MANIFEST_NAME).is_file():
                        found.append(Leftover(directory, _tree_bytes(directory), "no manifest"))
                        if remove:
                            log.info("gc removing %s: it has no manifest", directory)
                            self._trash(directory, key)
        if remove:
            self._sweep_locks()
        return found

    def _sweep_locks(self) -> None:
        if self.locks_dir.is_dir():
            for lock_file in self.locks_dir.glob("*.lock"):
                key = lock_file.stem
                if _is_key(key) and not self._object_dir(key).exists():
                    fd = self._try_lock(key, blocking=False)
                    if fd is not None:
                        # unlink while holding it: a waiter that opened the old file re-opens (see _try_lock)
                        with contextlib.suppress(FileNotFoundError):
                            lock_file.unlink()
                        os.close(fd)
