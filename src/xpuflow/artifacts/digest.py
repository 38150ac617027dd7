"""Content digests of models: what the artifact store keys builds on.

A model's digest is the sha256 of its content, so renaming or copying a model keeps its artifacts, and
changing one byte builds new ones::

    model_digest("/models/smollm2.gguf")   # == `sha256sum smollm2.gguf`
    model_digest("/models/minilm")         # a folder: relative names and file digests, sorted
    digest_text("http://10.0.0.5:8000/v1\\nllama-3-8b")   # remote models have no bytes to hash

Hashing a multi-GB model takes seconds, so file digests are cached in a small JSON index keyed by
(absolute path, size, mtime_ns, inode, ctime_ns): the second call on an unchanged file costs one
``stat`` and a small file read. Entries hashed within ``RACY_WINDOW_NS`` of the file's last change are
not trusted (as git treats "racily clean" index entries): a write landing in the same filesystem clock
tick as the one we hashed would keep size and mtime, so such files are hashed again next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from xpuflow.errors import ConfigError

__all__ = ["CHUNK_BYTES", "DigestIndex", "digest_text", "file_sha256", "model_digest"]

log = logging.getLogger(__name__)

#: Files are read in chunks of this size: large enough for hashlib to run without the GIL at full
#: speed, small enough to keep memory flat on multi-GB models.
CHUNK_BYTES = 1 << 20

#: Filesystem timestamps advance in clock ticks (1-10 ms on Linux); a file changed less than this long
#: before we hashed it may change again without changing its mtime, so its entry is not trusted.
RACY_WINDOW_NS = 50_000_000

#: The index keeps at most this many files; beyond it, entries of vanished files and then the oldest go.
MAX_INDEX_ENTRIES = 10_000

_TREE_HEADER = b"xpuflow-tree-v1\0"
_INDEX_VERSION = 1

#: index path -> (its stat key when parsed, its entries); saves re-parsing an unchanged index.
_PARSED: dict[str, tuple[list[int], dict[str, list[Any]]]] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of a file's bytes, streamed in ``CHUNK_BYTES`` chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def digest_text(text: str) -> str:
    """The sha256 (hex) of ``text`` in UTF-8: the digest of a model that has no local bytes, such as a
    remote server's base URL and model name."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _default_index_path() -> Path:
    from xpuflow.artifacts.store import default_store_root

    return default_store_root() / "digests.json"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class DigestIndex:
    """The on-disk cache of file digests. Losing it, or a lost update between two processes, costs only
    a re-hash; it never yields a wrong digest for a file whose size, mtime, inode or ctime changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, list[Any]] = self._read()
        self._dirty: dict[str, list[Any]] = {}

    def _read(self) -> dict[str, list[Any]]:
        try:
            with open(self.path, "rb") as file:
                st = os.fstat(file.fileno())
                cached = _PARSED.get(str(self.path))
                if cached is not None and cached[0] == _stat_key(st):
                    return dict(cached[1])  # unchanged since we last parsed it: skip the JSON parse
                data = json.loads(file.read())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.debug("digest index %s unreadable (%s); starting a new one", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != _INDEX_VERSION:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        _PARSED[str(self.path)] = (_stat_key(st), entries)
        return dict(entries)

    def file_digest(self, path: Path, st: os.stat_result) -> str:
        """The digest of ``path`` (whose ``stat`` the caller has), from the index when still valid."""
        name = str(path)
        key = _stat_key(st)
        entry = self._entries.get(name)
        if (
            isinstance(entry, list)
            and len(entry) == 6
            and entry[:4] == key
            and entry[5] - entry[1] >= RACY_WINDOW_NS  # hashed well after its last change
        ):
            return str(entry[4])
        hashed_at_ns = time.time_ns()
        sha = file_sha256(path)
        after = os.stat(path)
        if _stat_key(after) == key:  # it did not change while we read it
            record = [*key, sha, hashed_at_ns]
            self._entries[name] = record
            self._dirty[name] = record
        return sha

    def save(self) -> None:
        """Write new entries, merged with what other processes wrote meanwhile. Never raises."""
        if not self._dirty:
            return
        try:
            entries = self._read()
            entries.update(self._dirty)
            if len(entries) > MAX_INDEX_ENTRIES:
                entries = {k: v for k, v in entries.items() if os.path.exists(k)}
                newest = sorted(entries.items(), key=lambda kv: kv[1][5], reverse=True)
                entries = dict(newest[:MAX_INDEX_ENTRIES])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".digests.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump({"version": _INDEX_VERSION, "entries": entries}, file, separators=(",", ":"))
                os.replace(tmp, self.path)  # readers see the old or the new index, never half of one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._dirty.clear()
        except OSError as exc:  # a read-only cache folder only makes the next call slower
            log.debug("could not write digest index %s: %s", self.path, exc)


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as (relative POSIX name, path), hidden entries skipped.

    Symlinks are followed (Hugging Face snapshot folders are symlinks into a blob store); a folder
    reached twice through links is walked once.
    """
    files: list[tuple[str, Path]] = []
    seen_dirs: set[tuple[int, int]] = set()
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(current)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        # .git holds a second copy of LFS weights and changes on every `git status`; .cache holds
        # download bookkeeping. Neither is model content.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(current)
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = base / filename
            if path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    files.sort()
    return files


def model_digest(path: str | os.PathLike[str], *, index_path: Path | None = None) -> str:
    """The sha256 (hex) of a model file, or of a folder's content.

    For a file it is the plain sha256 of its bytes. For a folder it is the sha256 over every regular
    file's relative name and digest in sorted order (hidden files and folders such as ``.git`` are
    skipped), so it does not depend on where the folder lives. File digests are cached in the index at
    ``index_path`` (default: ``digests.json`` in the artifact store's default root).

    Raises ConfigError when the path does not exist, is not a file or folder, or is an empty folder.
    """
    target = Path(path).expanduser().absolute()
    try:
        st = os.stat(target)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"model path {target} does not exist; fix the deployment's 'model' field", field="model"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"model path {target} cannot be read: {exc}", field="model") from exc
    index = DigestIndex(index_path if index_path is not None else _default_index_path())
    try:
        if target.is_file():
            return index.file_digest(target, st)
        if not target.is_dir():
            raise ConfigError(f"model path {target} is neither a file nor a folder", field="model")
        files = _tree_files(target)
        if not files:
            raise ConfigError(
                f"model folder {target} holds no files; point 'model' at the model", field="model"
            )
        tree = hashlib.sha256(_TREE_HEADER)
        for name, file in files:
            sha = index.file_digest(file, os.stat(file))
            tree.update(name.encode("utf-8") + b"\0" + sha.encode("ascii") + b"\n")
        return tree.hexdigest()
    except PermissionError as exc:
        raise ConfigError(f"model path {target} cannot be read: {exc}", field="model") from exc
    finally:
        index.save()
