"""Content-addressed blobs: a file's name is its sha256, and no reader ever sees half of one.

Writes go to a temporary file on the same filesystem as the store, are fsynced, then renamed into
`root/sha256/<2 hex>/<digest>` (rename is atomic on one filesystem); the directory is fsynced so the
rename itself survives a crash. A digest is only ever a name for the bytes that hash to it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Protocol

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# A file inside a materialized version: a plain name, never a path or a hidden file.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_CHUNK = 1 << 20


class BlobStore(Protocol):
    """What the registry and engines need of a blob store: a local directory today, S3-compatible storage next.

    Every method takes or returns a sha256 hex digest; `open` yields exactly the bytes that hash to it.
    """

    def put_file(self, stream: BinaryIO, max_bytes: int | None = None, expected: str | None = None) -> str: ...

    def put_bytes(self, data: bytes, expected: str | None = None) -> str: ...

    def open(self, digest: str) -> BinaryIO: ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...

    def sweep_interrupted(self, older_than_s: float = 3600) -> int: ...


class BlobTooLarge(ValueError):
    """The stream was longer than the caller's limit; nothing was stored."""


class DigestMismatch(ValueError):
    """The bytes do not hash to the digest they were announced (or stored) under."""


def check_digest(digest: str) -> str:
    """`digest` if it is a lower-case sha256 hex string; anything else (a path, say) is refused."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """Blobs in a local directory: `root/sha256/ab/abcdef…`, temporary files in `root/tmp`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        # The temp directory sits inside the root so that the final rename never crosses filesystems.
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: str) -> Path:
        """Where the blob `digest` lives (whether or not it exists)."""
        check_digest(digest)
        return self.root / "sha256" / digest[:2] / digest

    def put_file(self, stream: BinaryIO, max_bytes: int | None = None, expected: str | None = None) -> str:
        """Store what `stream` holds and return its sha256; idempotent for identical content.

        Raises BlobTooLarge past `max_bytes`, DigestMismatch if the content does not hash to `expected`;
        in both cases nothing is stored and no temporary file is left behind.
        """
        if expected is not None:
            check_digest(expected)
        h, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(f"larger than {max_bytes} bytes")
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(f"content hashes to {digest}, not {expected}")
            final = self.path_of(digest)
            if final.is_file():  # same content, same name: nothing to write
                return digest
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        """Store `data` and return its sha256."""
        return self.put_file(io.BytesIO(data), expected=expected)

    def open(self, digest: str) -> BinaryIO:
        """The blob's bytes for reading; FileNotFoundError if there is none."""
        return self.path_of(digest).open("rb")

    def exists(self, digest: str) -> bool:
        """Whether the blob is stored."""
        return self.path_of(digest).is_file()

    def delete(self, digest: str) -> None:
        """Remove the blob (no error if it is already gone)."""
        self.path_of(digest).unlink(missing_ok=True)

    def sweep_interrupted(self, older_than_s: float = 3600) -> int:
        """Remove temporary files that writes killed mid-way left behind; returns how many.

        Only files older than `older_than_s`: replicas share this directory, and another one may be
        writing right now.
        """
        cutoff, removed = time.time() - older_than_s, 0
        for tmp in self._tmp.iterdir():
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:  # another replica swept it first
                pass
        return removed

    def verify(self, digest: str) -> bool:
        """Whether the stored bytes still hash to `digest` (a check for disk corruption)."""
        with self.open(digest) as f:
            return _sha256_of(f) == digest


def _sha256_of(stream: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def put_files(store: BlobStore, files: dict[str, Path]) -> dict[str, str]:
    """Store each file of a version as a blob: {file name: digest}, the inverse of `materialize`."""
    digests = {}
    for name, path in sorted(files.items()):
        with Path(path).open("rb") as f:
            digests[name] = store.put_file(f)
    return digests


def materialize(store: BlobStore, files: dict[str, str], dest: Path) -> Path:
    """Lay out `files` ({file name: digest}) as the directory `dest`, atomically, for an engine to load.

    The directory is built beside `dest`, each file checked against its digest while copied, then
    renamed into place, so an engine never loads a partial or corrupted version. A version never
    changes once made, so an existing `dest` is returned as it is.
    """
    dest = Path(dest)
    if dest.is_dir():
        return dest
    for name, digest in files.items():
        if not _FILE_NAME.match(name) or name in {".", ".."}:
            raise ValueError(f"not a plain file name: {name!r}")
        check_digest(digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for name, digest in files.items():
            h = hashlib.sha256()
            with store.open(digest) as src, (tmp / name).open("wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != digest:
                raise DigestMismatch(f"blob {digest} is corrupted: its bytes hash to {h.hexdigest()}")
        _fsync_dir(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another process made it first, with the same content
                raise
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
