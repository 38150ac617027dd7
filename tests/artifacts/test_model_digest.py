"""Model digests: content-only, folder-aware, and cached so an unchanged model is not hashed twice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from xpuflow.artifacts.digest import DigestIndex, digest_text, file_sha256, model_digest
from xpuflow.errors import ConfigError

HOUR_NS = 3600 * 10**9


@pytest.fixture
def index(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "digests.json"


def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "sub" / "weights.bin").write_bytes(b"\x01\x02" * 1000)
    return root


def age(path: Path, seconds: float = 3600.0) -> None:
    """Models are downloaded long before they are served; give a file an old mtime like theirs."""
    st = path.stat()
    delta_ns = int(seconds * 1e9)
    os.utime(path, ns=(st.st_atime_ns - delta_ns, st.st_mtime_ns - delta_ns))


def test_file_digest_is_plain_sha256(tmp_path: Path, index: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert model_digest(model, index_path=index) == expected
    assert file_sha256(model) == expected
    assert model_digest(str(model), index_path=index) == expected  # cached answer is the same


def test_folder_digest_depends_on_content_not_location(tmp_path: Path, index: Path) -> None:
    a = make_folder(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert model_digest(a, index_path=index) == model_digest(b, index_path=index)

    (b / "sub" / "weights.bin").write_bytes(b"\x01\x03" * 1000)
    changed = model_digest(b, index_path=index)
    assert changed != model_digest(a, index_path=index)

    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "sub" / "weights.bin").rename(c / "sub" / "weights2.bin")
    assert model_digest(c, index_path=index) != model_digest(a, index_path=index)


def test_folder_digest_skips_hidden_entries_and_follows_symlinks(tmp_path: Path, index: Path) -> None:
    folder = make_folder(tmp_path / "m")
    before = model_digest(folder, index_path=index)
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_bytes(b"changes on every git status")
    (folder / ".DS_Store").write_bytes(b"x")
    assert model_digest(folder, index_path=index) == before

    # a Hugging Face snapshot: the folder holds symlinks into a blob store
    blobs = tmp_path / "blobs"
    shutil.copytree(folder, blobs, ignore=shutil.ignore_patterns(".*"))
    snapshot = tmp_path / "snapshot"
    (snapshot / "sub").mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blobs / "config.json")
    (snapshot / "sub" / "weights.bin").symlink_to(blobs / "sub" / "weights.bin")
    assert model_digest(snapshot, index_path=index) == before


def test_bad_paths_are_config_errors(tmp_path: Path, index: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as missing:
        model_digest(tmp_path / "nope.gguf", index_path=index)
    assert missing.value.field == "model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no files"):
        model_digest(tmp_path / "empty", index_path=index)


def test_digest_text() -> None:
    assert digest_text("abc") == hashlib.sha256(b"abc").hexdigest()
    assert digest_text("http://a/v1\nm1") != digest_text("http://a/v1\nm2")


def test_second_call_on_a_100_mb_file_costs_well_under_a_millisecond(tmp_path: Path, index: Path) -> None:
    model = tmp_path / "big.bin"
    with open(model, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: quick to create, still 100 MB to hash
        f.write(b"header")
    age(model)
    start = time.perf_counter()
    first = model_digest(model, index_path=index)
    first_s = time.perf_counter() - start
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        assert model_digest(model, index_path=index) == first
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1e-3, timings
    assert first_s > 20 * min(timings)


def test_cache_survives_processes_through_its_index_file(tmp_path: Path, index: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc" * 1000)
    age(model)
    digest = model_digest(model, index_path=index)
    data = json.loads(index.read_text())
    assert data["entries"][str(model.absolute())][4] == digest


def forge_entry(index: Path, model: Path, sha: str, *, hashed_after_change_ns: int) -> None:
    """Write an index entry claiming ``sha`` for ``model`` as it is now, hashed some ns after its mtime."""
    st = model.stat()
    entry = [
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
        st.st_ctime_ns,
        sha,
        st.st_mtime_ns + hashed_after_change_ns,
    ]
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"version": 1, "entries": {str(model.absolute()): entry}}))


def test_a_valid_index_entry_is_trusted_without_reading_the_file(tmp_path: Path, index: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    age(model)
    forge_entry(index, model, "f" * 64, hashed_after_change_ns=HOUR_NS)
    assert model_digest(model, index_path=index) == "f" * 64


def test_a_racily_clean_entry_is_hashed_again(tmp_path: Path, index: Path) -> None:
    # hashed within the filesystem's clock tick of the last write: a second write could keep the mtime
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    age(model)
    forge_entry(index, model, "f" * 64, hashed_after_change_ns=1_000)
    assert model_digest(model, index_path=index) == hashlib.sha256(b"abc").hexdigest()


def test_a_rewrite_with_the_same_size_and_mtime_is_noticed(tmp_path: Path, index: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    age(model)
    assert model_digest(model, index_path=index) == hashlib.sha256(b"abc").hexdigest()
    st = model.stat()
    model.write_bytes(b"xyz")
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or rsync -t would leave it
    assert model_digest(model, index_path=index) == hashlib.sha256(b"xyz").hexdigest()


def test_an_unreadable_or_unwritable_index_only_costs_speed(tmp_path: Path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    garbage = tmp_path / "digests.json"
    garbage.write_text("{not json")
    assert model_digest(model, index_path=garbage) == hashlib.sha256(b"abc").hexdigest()
    blocker = tmp_path / "file"
    blocker.write_text("")
    # the index's folder is a file: saving fails quietly
    assert model_digest(model, index_path=blocker / "digests.json") == hashlib.sha256(b"abc").hexdigest()


def test_index_merges_writes_of_other_processes(tmp_path: Path, index: Path) -> None:
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    one.write_bytes(b"1")
    two.write_bytes(b"2")
    age(one)
    age(two)
    first, second = DigestIndex(index), DigestIndex(index)  # two processes opened the index
    first.file_digest(one.absolute(), one.stat())
    second.file_digest(two.absolute(), two.stat())
    first.save()
    second.save()
    entries = json.loads(index.read_text())["entries"]
    assert set(entries) == {str(one.absolute()), str(two.absolute())}


def test_default_index_lives_in_the_store_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XPUFLOW_CACHE_DIR", str(tmp_path / "store"))
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    age(model)
    model_digest(model)
    assert (tmp_path / "store" / "digests.json").is_file()
