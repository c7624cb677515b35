"""Content-addressed blobs in S3-compatible storage, shared by every replica, each with a local cache.

An object's key is `<prefix>/sha256/<2 hex>/<digest>`. A PUT (or a completed multipart upload) makes an
object appear whole or not at all, so, as with the local store's rename, no reader ever sees half of
one. Every byte that reaches the cache is checked against its digest first: the cache is only ever a
copy of what the digest names, whatever the bucket holds.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters_store.blobs import LocalBlobStore, check_digest
from adapters_store.errors import BlobStorageError

_CHUNK = 1 << 20
# The error codes S3 answers for a key (or an upload) that is not there; NoSuchBucket is deliberately not
# one of them: a missing bucket is a misconfiguration, not a missing blob.
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def s3_client(endpoint_url: str | None = None) -> BaseClient:
    """An S3 client on `endpoint_url` (default: AWS), credentials from the usual AWS_* variables."""
    options: dict = {"retries": {"mode": "standard", "max_attempts": 5}}
    if endpoint_url:
        # MinIO and other S3 API servers rarely resolve <bucket>.<host>: address buckets in the path.
        options["s3"] = {"addressing_style": "path"}
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))


@contextmanager
def _s3(what: str) -> Iterator[None]:
    """Report S3's failures in the store's terms: a missing key as FileNotFoundError, the rest as BlobStorageError."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _MISSING:
            raise FileNotFoundError(f"{what}: not found") from None
        raise BlobStorageError(f"{what} failed: {code} {error.get('Message', '')}".rstrip()) from exc
    except (BotoCoreError, S3UploadFailedError) as exc:
        raise BlobStorageError(f"{what} failed: {exc}") from exc


class S3BlobStore:
    """Blobs in `bucket` under `prefix`, cached in `cache_dir` (a LocalBlobStore of this replica's own).

    `client` if given, else one on `endpoint_url`; files of `multipart_threshold` bytes or more go up in parts.
    """

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, *, client: BaseClient | None = None,
                 endpoint_url: str | None = None, multipart_threshold: int = 8 << 20):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or s3_client(endpoint_url)
        self.cache = LocalBlobStore(cache_dir)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold)

    @property
    def _keys_under(self) -> str:
        return f"{self.prefix}/sha256/" if self.prefix else "sha256/"

    def key_of(self, digest: str) -> str:
        """The object key of the blob `digest` (whether or not it exists)."""
        check_digest(digest)
        return f"{self._keys_under}{digest[:2]}/{digest}"

    def _where(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self.key_of(digest)}"

    def check_bucket(self) -> None:
        """Raise BlobStorageError, saying why, unless the bucket exists and these credentials may use it."""
        where = f"bucket {self.bucket!r} on {self.client.meta.endpoint_url}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"404", "NoSuchBucket", "NotFound"}:
                raise BlobStorageError(f"{where} does not exist: create it, or correct blob_url") from None
            if code in {"403", "AccessDenied", "Forbidden"}:
                raise BlobStorageError(f"{where}: access denied; check the credentials (AWS_* variables)") from None
            raise BlobStorageError(f"{where} cannot be used: {code}") from exc
        except BotoCoreError as exc:
            raise BlobStorageError(f"{where} is unreachable: {exc}") from exc

    def _size_in_bucket(self, digest: str) -> int | None:
        try:
            with _s3(f"HEAD {self._where(digest)}"):
                return self.client.head_object(Bucket=self.bucket, Key=self.key_of(digest))["ContentLength"]
        except FileNotFoundError:
            return None

    def put_file(self, stream: BinaryIO, max_bytes: int | None = None, expected: str | None = None) -> str:
        """Store what `stream` holds and return its sha256 once the object is in the bucket; idempotent.

        Raises BlobTooLarge past `max_bytes`, DigestMismatch if the content does not hash to `expected`
        (nothing stored, in the bucket or the cache), BlobStorageError if the upload fails.
        """
        # The cache hashes while it writes and enforces both limits, and the upload needs a file it can
        # re-read: each part, and each retry of a request, is read again from its offset.
        digest = self.cache.put_file(stream, max_bytes, expected)
        path = self.cache.path_of(digest)
        # The registry names a digest only after this returns, and S3 shows an object only once its PUT or
        # multipart upload completes: an upload that dies half-way leaves no object, hence no reference to
        # half a blob. An object of another size is a truncated copy (written outside this store), so it
        # is replaced; same key, same bytes, so overwriting is harmless to readers.
        if self._size_in_bucket(digest) != path.stat().st_size:
            # If this fails the verified cached copy stays, and the next put of this content uploads it.
            with _s3(f"upload to {self._where(digest)}"):
                self.client.upload_file(str(path), self.bucket, self.key_of(digest), Config=self._transfer)
        return digest

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        """Store `data` and return its sha256."""
        return self.put_file(io.BytesIO(data), expected=expected)

    def open(self, digest: str) -> BinaryIO:
        """The blob's bytes for reading, from the cache, fetched and verified first if absent.

        FileNotFoundError if the bucket has no such blob; DigestMismatch (nothing cached) if its object
        does not hash to `digest`.
        """
        if self.cache.exists(digest):
            return self.cache.open(digest)
        with _s3(f"GET {self._where(digest)}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key_of(digest))["Body"]
            try:
                # Streams into a temporary file and moves it into the cache only if it hashes to `digest`.
                self.cache.put_file(body, expected=digest)
            finally:
                body.close()
        return self.cache.open(digest)

    def exists(self, digest: str) -> bool:
        """Whether the bucket holds the blob: the shared answer, whatever this replica's cache has."""
        return self._size_in_bucket(digest) is not None

    def delete(self, digest: str) -> None:
        """Remove the blob from the bucket and this replica's cache (no error if it is already gone)."""
        with _s3(f"DELETE {self._where(digest)}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key_of(digest))
        self.cache.delete(digest)

    def sweep_interrupted(self, older_than_s: float = 3600) -> int:
        """Remove what writes killed mid-way left behind: the cache's temporary files and the bucket's
        incomplete multipart uploads under this prefix; returns how many.

        Only those older than `older_than_s`: other replicas may be uploading right now. (The bucket
        dates uploads by its own clock; the default hour dwarfs any sane skew.)
        """
        removed = self.cache.sweep_interrupted(older_than_s)
        cutoff = time.time() - older_than_s
        with _s3(f"listing uploads in s3://{self.bucket}/{self._keys_under}"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._keys_under)
            stale = [u for page in pages for u in page.get("Uploads", []) if u["Initiated"].timestamp() < cutoff]
        for upload in stale:
            try:
                with _s3(f"aborting the upload to s3://{self.bucket}/{upload['Key']}"):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                removed += 1
            except FileNotFoundError:  # another replica aborted it first
                pass
        return removed

    def verify(self, digest: str) -> bool:
        """Whether the bucket's object still hashes to `digest` (the shared copy, not this replica's cache)."""
        h = hashlib.sha256()
        with _s3(f"GET {self._where(digest)}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key_of(digest))["Body"]
            try:
                while chunk := body.read(_CHUNK):
                    h.update(chunk)
            finally:
                body.close()
        return h.hexdigest() == digest
