"""Content-addressed blobs: named by sha256, never half-written, checked when laid out for an engine."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from adapters_store.blobs import BlobTooLarge, DigestMismatch, LocalBlobStore, check_digest, materialize


def test_a_blob_is_named_by_its_sha256_and_stored_once(tmp_path):
    store = LocalBlobStore(tmp_path)
    data = os.urandom(3 << 20)  # larger than one copy chunk
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.path_of(digest) == tmp_path / "sha256" / digest[:2] / digest
    assert store.put_file(io.BytesIO(data)) == digest, "identical content: the same name, nothing new"
    assert store.exists(digest) and store.open(digest).read() == data and store.verify(digest)
    assert [p.name for p in (tmp_path / "sha256").rglob("*") if p.is_file()] == [digest]
    store.delete(digest)
    assert not store.exists(digest)
    store.delete(digest)  # deleting twice is not an error


def test_refused_writes_leave_nothing_behind(tmp_path):
    store = LocalBlobStore(tmp_path)
    with pytest.raises(BlobTooLarge):
        store.put_file(io.BytesIO(b"x" * 2048), max_bytes=1024)
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"hello", expected=hashlib.sha256(b"other").hexdigest())
    assert store.put_bytes(b"hello", expected=hashlib.sha256(b"hello").hexdigest())
    assert not list((tmp_path / "tmp").iterdir()), "no temporary file survives a write, refused or not"
    assert len([p for p in (tmp_path / "sha256").rglob("*") if p.is_file()]) == 1


class _SlowStream(io.RawIOBase):
    """A stream that blocks after its first chunk until released: a writer caught mid-write."""

    def __init__(self, data: bytes, release: threading.Event):
        self.data, self.release, self.sent = data, release, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.sent and not self.release.is_set():
            self.release.wait(10)
        chunk = self.data[self.sent:self.sent + min(n if n > 0 else len(self.data), 1 << 20)]
        self.sent += len(chunk)
        return chunk


def test_a_reader_never_sees_a_half_written_blob(tmp_path):
    store = LocalBlobStore(tmp_path)
    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest()
    release = threading.Event()
    stream = _SlowStream(data, release)
    writer = threading.Thread(target=store.put_file, args=(stream,))
    writer.start()
    try:
        while not stream.sent:  # the writer has its first chunk and waits for the rest
            time.sleep(0.01)
        assert any((tmp_path / "tmp").iterdir())
        assert not store.exists(digest) and not store.path_of(digest).exists()
    finally:
        release.set()
        writer.join()
    assert store.open(digest).read() == data


def test_digests_that_are_paths_are_refused(tmp_path):
    store = LocalBlobStore(tmp_path)
    for bad in ["../../etc/passwd", "A" * 64, "0" * 63, ""]:
        with pytest.raises(ValueError):
            check_digest(bad)
        with pytest.raises(ValueError):
            store.open(bad)


def test_materialize_builds_a_version_directory_atomically_and_checks_digests(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    files = {"adapter_config.json": store.put_bytes(b'{"r": 8}'),
             "adapter_model.safetensors": store.put_bytes(os.urandom(4096))}
    out = materialize(store, files, tmp_path / "versions" / "acme@1")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == files
    assert [p.name for p in (tmp_path / "versions").iterdir()] == ["acme@1"], "no temporary directory left"
    assert materialize(store, files, out) == out, "a version directory is made once"

    with pytest.raises(ValueError):
        materialize(store, {"../adapter_config.json": files["adapter_config.json"]}, tmp_path / "versions" / "x")
    # A blob corrupted on disk is caught while copying, and no directory appears.
    store.path_of(files["adapter_model.safetensors"]).write_bytes(b"rotten")
    with pytest.raises(DigestMismatch):
        materialize(store, files, tmp_path / "versions" / "acme@2")
    assert [p.name for p in (tmp_path / "versions").iterdir()] == ["acme@1"]


def test_sweep_removes_only_old_temporary_files(tmp_path):
    store = LocalBlobStore(tmp_path)
    kept = store.put_bytes(b"a blob")
    old, fresh = tmp_path / "tmp" / "killed-write", tmp_path / "tmp" / "another-replica-writing"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.sweep_interrupted(older_than_s=3600) == 1
    assert not old.exists() and fresh.exists() and store.verify(kept)
