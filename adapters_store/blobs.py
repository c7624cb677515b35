"""Content-addressed blobs: a file's name is its sha256, and no reader ever sees half of one.

Writes go to a temporary file in the store, are fsynced, then renamed into place (rename is
atomic on one filesystem); the directory is fsynced so the rename survives a crash too.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BlobStore(Protocol):
    """What the registry needs of a blob store; a local directory today, S3-compatible storage next."""

    def put_stream(self, stream: BinaryIO, max_bytes: int | None = None) -> str: ...

    def put_bytes(self, data: bytes) -> str: ...

    def open(self, digest: str) -> BinaryIO: ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...


class BlobTooLarge(ValueError):
    pass


def check_digest(digest: str) -> str:
    """`digest` if it is a sha256 hex string; anything else (a path, say) is refused."""
    if not _DIGEST.match(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "sha256" / digest[:2] / digest

    def put_stream(self, stream: BinaryIO, max_bytes: int | None = None) -> str:
        """Store what `stream` holds; returns its sha256. Refuses (BlobTooLarge) past `max_bytes`."""
        h, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
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
            final = self.path(digest)
            if final.exists():  # same content, same name: nothing to write
                return digest
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return digest
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        return self.put_stream(io.BytesIO(data))

    def open(self, digest: str) -> BinaryIO:
        return self.path(digest).open("rb")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)


def materialize(store: BlobStore, files: dict[str, str], dest: Path) -> Path:
    """Lay out `files` ({file name: digest}) as directory `dest`, atomically; an existing `dest` is kept.

    Engines load adapters from directories; a version's directory never changes once made.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for name, digest in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"not a plain file name: {name!r}")
            with store.open(digest) as src, (tmp / name).open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError:
        if not dest.is_dir():  # else another process made it first, with the same content
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
