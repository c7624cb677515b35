"""The store's parts over one Redis and one blob store, opened together: what a gateway or a worker is built on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis

from adapters_store.blob_url import open_blob_store
from adapters_store.blobs import BlobStore
from adapters_store.evaluation import EvaluationStore
from adapters_store.jobs import JobQueue
from adapters_store.keys import ApiKeyStore
from adapters_store.memories import Memories
from adapters_store.registry import Registry
from adapters_store.replicas import ReplicaDirectory
from adapters_store.replication import Acks


@dataclass
class Store:
    registry: Registry
    blobs: BlobStore
    keys: ApiKeyStore
    evals: EvaluationStore
    jobs: JobQueue
    replicas: ReplicaDirectory  # heartbeats: which replicas are alive and what they host
    memories: Memories  # side memories (knowledge edits): versions, pointers, targets
    redis_url: str  # where the registry is: a redis:// URL, or sentinel://host:port,…/primary-name
    events: Callable[[], aioredis.Redis] | None = None  # new asyncio clients for pub/sub (follow a failover)

    @classmethod
    def open(cls, client: redis.Redis, redis_url: str, prefix: str, blob_dir: Path, *, job_max_attempts: int = 3,
             job_backoff_s: float = 1.0, job_claim_idle_s: float = 30.0, acks: Acks = Acks(),
             events: Callable[[], aioredis.Redis] | None = None, blob_url: str | None = None,
             s3_endpoint_url: str | None = None) -> Store:
        """Every part on `client` under `prefix`; registry and key changes acked per `acks`.

        Blobs in `blob_dir`, or in `blob_url` ("s3://bucket/prefix", on `s3_endpoint_url`) with `blob_dir`
        as this process's cache.
        """
        blobs = open_blob_store(blob_url, blob_dir, s3_endpoint_url)
        jobs = JobQueue(client, prefix, max_attempts=job_max_attempts, backoff_s=job_backoff_s,
                        claim_idle_s=job_claim_idle_s)
        registry = Registry(client, prefix, acks)
        return cls(registry=registry, memories=Memories(registry), blobs=blobs, keys=ApiKeyStore(client, prefix, acks),
                   evals=EvaluationStore(client, blobs, prefix), jobs=jobs,
                   replicas=ReplicaDirectory(client, prefix), redis_url=redis_url, events=events)
