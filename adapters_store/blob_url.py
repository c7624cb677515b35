"""Which blob store a deployment uses, from its configuration: a local directory, or an S3 bucket."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from adapters_store.blobs import BlobStore, LocalBlobStore
from adapters_store.s3_blobs import S3BlobStore

ACCEPTED = "none (blobs in the local directory) or s3://bucket[/prefix]"


def open_blob_store(blob_url: str | None, cache_dir: Path, s3_endpoint_url: str | None = None) -> BlobStore:
    """The store `blob_url` names: None for a LocalBlobStore in `cache_dir`, "s3://bucket/prefix" for an
    S3BlobStore caching in `cache_dir` (its bucket checked now, so a wrong one fails at start, not on first use).

    ValueError for any other form.
    """
    # An empty value is what an environment variable set to nothing gives: it means "not set".
    if not blob_url:
        return LocalBlobStore(cache_dir)
    url = urlsplit(blob_url)
    if url.scheme != "s3" or not url.netloc or url.query or url.fragment:
        raise ValueError(f"blob_url {blob_url!r} is not one of the accepted forms: {ACCEPTED}")
    store = S3BlobStore(url.netloc, url.path, cache_dir, endpoint_url=s3_endpoint_url)
    store.check_bucket()
    return store
