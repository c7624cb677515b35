"""Wiring for the command line: the store on the configured Redis, and a worker with every update job."""

from __future__ import annotations

from adapters_store.redis_server import acks, connect, describe, event_client_factory
from adapters_store.store import Store
from adapters_store.validation import Limits
from service.settings import Settings


def open_store(settings: Settings) -> Store:
    """The registry, blob store, key store, evaluations and job queue on the configured (or embedded) Redis."""
    client = connect(settings)
    return Store.open(client, describe(settings), settings.redis_prefix, settings.blob_path,
                      job_max_attempts=settings.job_max_attempts, job_backoff_s=settings.job_backoff_s,
                      job_claim_idle_s=settings.job_claim_idle_s, acks=acks(settings),
                      events=event_client_factory(settings), blob_url=settings.blob_url,
                      s3_endpoint_url=settings.s3_endpoint_url)


def build_worker(store: Store, settings: Settings):
    """A worker over `store` with the update jobs (evaluate, gated activate, extract, port)."""
    from service.evaluation.evaluator import Evaluator
    from service.jobs import handlers
    from service.jobs.context import JobContext
    from service.jobs.worker import Worker

    work_dir = settings.data_dir / "worker"
    ctx = JobContext(store.registry, store.evals, Evaluator(store.blobs, work_dir), store.blobs,
                     Limits.from_settings(settings), work_dir, store.replicas, store.memories, settings.memory_layer)
    return Worker(store.jobs, handlers(ctx))
