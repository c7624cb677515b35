"""Blobs in S3-compatible storage, against a real S3 API server (moto's, started for this module): named
by sha256, never half-written, every byte checked before a replica caches it."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import redis
from botocore.exceptions import EndpointConnectionError

from adapters_store.blob_url import open_blob_store
from adapters_store.blobs import BlobTooLarge, DigestMismatch, LocalBlobStore, materialize, put_files
from adapters_store.errors import BlobStorageError
from adapters_store.s3_blobs import S3BlobStore
from adapters_store.store import Store
from tests.prometheus_server import free_port
from tests.s3_server import CREDENTIALS, S3Server

BUCKET = "patchserve-blobs"


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory) -> Iterator[str]:
    """The URL of a moto S3 server on loopback, with BUCKET created, for this module."""
    server = S3Server(tmp_path_factory.mktemp("moto"), (BUCKET,)).start()
    try:
        yield server.url
    finally:
        server.stop()


def raw_client(url: str):
    """A client of its own (so that event hooks one test adds reach no other)."""
    return boto3.client("s3", endpoint_url=url, **CREDENTIALS)


@pytest.fixture
def s3(s3_url):
    return raw_client(s3_url)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own in the shared bucket."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def new_store(s3_url, prefix, tmp_path) -> Callable[..., S3BlobStore]:
    """Stores on this test's prefix, each (by `cache` name) with a cache directory of its own: replicas."""

    def new(cache: str = "cache", **kwargs) -> S3BlobStore:
        return S3BlobStore(BUCKET, prefix, tmp_path / cache, client=raw_client(s3_url), **kwargs)

    return new


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials where a store that makes its own client finds them, and no developer's profile."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def keys_under(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])]


def uploads_under(s3, prefix: str) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "/").get("Uploads", [])


def temp_files(store: S3BlobStore) -> list[Path]:
    return list((store.cache.root / "tmp").iterdir())


def count_calls(client, operation: str) -> list[int]:
    """A one-element list counting `operation`'s calls on `client` from now on."""
    calls = [0]

    def count(**_):
        calls[0] += 1

    client.meta.events.register(f"before-call.s3.{operation}", count)
    return calls


def test_a_blob_is_an_object_named_by_its_sha256_and_uploaded_once(new_store, s3, prefix):
    store = new_store()
    data = os.urandom(3 << 20)
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.key_of(digest) == f"{prefix}/sha256/{digest[:2]}/{digest}"
    assert s3.get_object(Bucket=BUCKET, Key=store.key_of(digest))["Body"].read() == data
    puts = count_calls(store.client, "PutObject")
    assert store.put_file(io.BytesIO(data)) == digest, "identical content: the same name"
    assert puts[0] == 0, "an object already in the bucket is not uploaded again"
    assert store.exists(digest) and store.open(digest).read() == data and store.verify(digest)
    assert keys_under(s3, prefix) == [store.key_of(digest)]
    store.delete(digest)
    assert not store.exists(digest) and not store.cache.exists(digest) and keys_under(s3, prefix) == []
    with pytest.raises(FileNotFoundError):
        store.open(digest)
    with pytest.raises(FileNotFoundError):
        store.verify(digest)
    store.delete(digest)  # deleting twice is not an error


def test_refused_writes_leave_nothing_in_the_bucket_or_the_cache(new_store, s3, prefix):
    store = new_store()
    with pytest.raises(BlobTooLarge):
        store.put_file(io.BytesIO(b"x" * 2048), max_bytes=1024)
    with pytest.raises(DigestMismatch):
        store.put_bytes(b"hello", expected=hashlib.sha256(b"other").hexdigest())
    assert keys_under(s3, prefix) == [] and temp_files(store) == []
    assert not [p for p in (store.cache.root / "sha256").rglob("*") if p.is_file()]
    digest = store.put_bytes(b"hello", expected=hashlib.sha256(b"hello").hexdigest())
    assert keys_under(s3, prefix) == [store.key_of(digest)]


def test_a_replica_reads_what_another_wrote_verified_then_from_its_cache(new_store):
    writer, reader = new_store("writer"), new_store("reader")
    data = os.urandom(1 << 20)
    digest = writer.put_bytes(data)
    assert reader.exists(digest) and not reader.cache.exists(digest)
    gets = count_calls(reader.client, "GetObject")
    with reader.open(digest) as f:
        assert f.read() == data
    assert gets[0] == 1 and reader.cache.exists(digest) and reader.cache.verify(digest)
    with reader.open(digest) as f:
        assert f.read() == data
    assert gets[0] == 1, "the second read is served from the cache"
    assert temp_files(reader) == []


def test_an_object_corrupted_in_the_bucket_is_refused_and_never_cached(new_store, s3):
    writer, reader = new_store("writer"), new_store("reader")
    data = os.urandom(1 << 20)
    digest = writer.put_bytes(data)
    s3.put_object(Bucket=BUCKET, Key=writer.key_of(digest), Body=os.urandom(1 << 20))
    with pytest.raises(DigestMismatch):
        reader.open(digest)
    assert not reader.cache.exists(digest) and temp_files(reader) == []
    assert not reader.verify(digest)
    assert writer.open(digest).read() == data, "the writer's cached copy was checked when written"
    # An object of the wrong size is a truncated copy: putting the content again replaces it.
    s3.put_object(Bucket=BUCKET, Key=writer.key_of(digest), Body=data[:1000])
    assert writer.put_bytes(data) == digest and reader.open(digest).read() == data


def test_materialize_from_s3_lays_out_the_version(new_store, tmp_path):
    writer, reader = new_store("writer"), new_store("reader")
    src = tmp_path / "src"
    src.mkdir()
    contents = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(2 << 20)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    files = put_files(writer, {name: src / name for name in contents})
    dest = materialize(reader, files, tmp_path / "versions" / "v1")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == contents


class _BrokenStream(io.RawIOBase):
    """A client's upload that breaks off after `good` bytes."""

    def __init__(self, good: int):
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("the client went away")
        chunk = b"x" * min(self.left, n if n > 0 else self.left)
        self.left -= len(chunk)
        return chunk


def test_an_upload_that_fails_midway_leaves_no_object(new_store, s3, prefix):
    store = new_store(multipart_threshold=8 << 20)
    with pytest.raises(ConnectionResetError):
        store.put_file(_BrokenStream(3 << 20))
    assert keys_under(s3, prefix) == [] and temp_files(store) == []

    data = os.urandom(12 << 20)  # two parts: 8 MiB and 4 MiB
    digest = hashlib.sha256(data).hexdigest()
    parts, lock = [0], threading.Lock()

    def second_part_fails(**_):
        with lock:
            parts[0] += 1
            if parts[0] == 2:
                raise EndpointConnectionError(endpoint_url=store.client.meta.endpoint_url)

    store.client.meta.events.register("before-call.s3.UploadPart", second_part_fails)
    with pytest.raises(BlobStorageError, match="upload"):
        store.put_bytes(data)
    assert not store.exists(digest) and keys_under(s3, prefix) == []
    assert uploads_under(s3, prefix) == [], "the failed multipart upload was aborted"
    assert store.put_bytes(data) == digest, "the next try uploads it"
    assert new_store("reader").open(digest).read() == data


def test_sweep_aborts_uploads_a_killed_writer_left_incomplete(new_store, s3, prefix):
    store = new_store()
    data = os.urandom(5 << 20)
    digest = hashlib.sha256(data).hexdigest()
    # What a writer killed mid-upload leaves: a multipart upload at the digest's key, never completed.
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=store.key_of(digest))["UploadId"]
    s3.upload_part(Bucket=BUCKET, Key=store.key_of(digest), UploadId=upload, PartNumber=1, Body=data)
    elsewhere = s3.create_multipart_upload(Bucket=BUCKET, Key=f"other-app/{uuid.uuid4().hex}")
    (store.cache.root / "tmp" / "leftover").write_bytes(b"half a blob")
    try:
        assert not store.exists(digest) and keys_under(s3, prefix) == []
        with pytest.raises(FileNotFoundError):
            store.open(digest)
        # moto dates every upload 2010-11-10 whenever it began, so "recent" is measured from the date it reports.
        age = time.time() - uploads_under(s3, prefix)[0]["Initiated"].timestamp()
        assert store.sweep_interrupted(older_than_s=age + 600) == 0, "a recent upload may still be under way"
        assert len(uploads_under(s3, prefix)) == 1
        assert store.sweep_interrupted(older_than_s=0) == 2  # the upload and the cache's temporary file
        assert uploads_under(s3, prefix) == [] and temp_files(store) == []
        assert uploads_under(s3, "other-app"), "uploads outside the store's prefix are not its to abort"
        assert keys_under(s3, prefix) == []
    finally:
        s3.abort_multipart_upload(Bucket=BUCKET, Key=elsewhere["Key"], UploadId=elsewhere["UploadId"])


def test_a_large_blob_goes_up_in_parts_and_reads_back_whole(new_store, s3):
    writer, reader = new_store("writer", multipart_threshold=8 << 20), new_store("reader")
    data = os.urandom(20 << 20)
    digest = writer.put_bytes(data)
    etag = s3.head_object(Bucket=BUCKET, Key=writer.key_of(digest))["ETag"]
    assert etag.strip('"').endswith("-3"), f"not a three-part upload: {etag}"
    with reader.open(digest) as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    assert reader.verify(digest)


def test_the_blob_url_picks_the_store(aws_env, s3_url, s3, prefix, tmp_path):
    # Store.open contacts no Redis server, so a client of none will do.
    client = redis.Redis(port=free_port())
    store = Store.open(client, "redis://unused", "t:", tmp_path / "cache", blob_url=f"s3://{BUCKET}/{prefix}/",
                       s3_endpoint_url=s3_url)
    assert isinstance(store.blobs, S3BlobStore) and store.blobs.prefix == prefix
    digest = store.blobs.put_bytes(b"through the store")
    assert keys_under(s3, prefix) == [store.blobs.key_of(digest)]
    assert isinstance(Store.open(client, "redis://unused", "t:", tmp_path / "local").blobs, LocalBlobStore)
    bare = open_blob_store(f"s3://{BUCKET}", tmp_path / "bare", s3_url)
    assert bare.key_of(digest) == f"sha256/{digest[:2]}/{digest}"
    for bad in ["gs://bucket/prefix", "/var/blobs", "s3:///no-bucket", "s3://bucket/p?versionId=1"]:
        with pytest.raises(ValueError, match="s3://bucket"):
            open_blob_store(bad, tmp_path / "x", s3_url)
    with pytest.raises(BlobStorageError, match="no-such-bucket.*does not exist"):
        open_blob_store("s3://no-such-bucket/p", tmp_path / "x", s3_url)


def test_storage_failures_name_the_bucket_and_are_not_missing_blobs(s3_url, tmp_path):
    store = S3BlobStore("no-such-bucket", "p", tmp_path, client=raw_client(s3_url))
    with pytest.raises(BlobStorageError, match="no-such-bucket"):
        store.put_bytes(b"data")
    with pytest.raises(BlobStorageError, match="NoSuchBucket"):  # not FileNotFoundError: no blob is known missing
        store.open(hashlib.sha256(b"never stored").hexdigest())
