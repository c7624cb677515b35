"""The worker loop: take a job, run its handler with a progress callback, record the outcome.

Runs as `patchserve worker` or, on embedded defaults, as a thread inside `patchserve serve`. Several
workers may share one Redis: the consumer group hands each job to one of them, and a job a dead
worker left behind is claimed by another (adapters_store/jobs.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from adapters_store.jobs import Delivery, Job, JobQueue
from service import metrics

log = logging.getLogger("patchserve.worker")

Progress = Callable[[float, str], None]
Handler = Callable[[Job, Progress], dict]


class JobRefused(Exception):
    """A job that cannot succeed however often it is tried (bad parameters, a missing version): no retry."""


class Worker:
    """Takes jobs from `queue` and runs the handler registered for each job's type."""

    def __init__(self, queue: JobQueue, handlers: dict[str, Handler], consumer: str | None = None):
        self.queue = queue
        self.handlers = handlers
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for type_ in handlers:  # series at 0 from the start, so "none yet" reads as 0, not as no data
            metrics.dead_letters.labels(type_)
            for outcome in ("succeeded", "retrying", "failed"):
                metrics.jobs.labels(type_, outcome)

    def start(self) -> Worker:
        """Run in a background thread (inside the gateway)."""
        self.queue.ensure_group()
        self._thread = threading.Thread(target=self.run, name="patchserve-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def run(self) -> None:
        """Take and run jobs until stopped."""
        self.queue.ensure_group()
        log.info("worker started", extra={"fields": {"consumer": self.consumer}})
        while not self._stop.is_set():
            try:
                delivery = self.queue.take(self.consumer, block_ms=500)
            except Exception as exc:  # Redis away: wait and try again, nothing is lost (entries stay pending)
                metrics.redis_up.set(0)
                log.warning("job queue unreachable", extra={"fields": {"error": repr(exc)}})
                self._stop.wait(1.0)
                continue
            if delivery is not None:
                self.handle(delivery)

    def handle(self, delivery: Delivery) -> None:
        """Run one delivered job to an outcome: succeeded, retrying, or failed (dead letter)."""
        job = delivery.job
        if job.done:  # delivered again after it was recorded (at-least-once): never run twice
            self.queue.ack(delivery)
            return
        handler = self.handlers.get(job.type)
        if handler is None:
            self._finish(job, self.queue.fail(delivery, f"no handler for job type {job.type!r}", retry=False), 0.0)
            return
        job = self.queue.start(delivery)
        started = time.perf_counter()

        def progress(percent: float, stage: str) -> None:
            self.queue.progress(delivery, self.consumer, percent, stage)
            log.info("job progress", extra={"fields": {"job": job.id, "type": job.type,
                                                       "percent": round(percent, 1), "stage": stage}})

        try:
            result = handler(job, progress)
        except JobRefused as exc:
            self._finish(job, self.queue.fail(delivery, str(exc), retry=False), time.perf_counter() - started)
        except Exception as exc:
            log.exception("job failed", extra={"fields": {"job": job.id, "type": job.type}})
            self._finish(job, self.queue.fail(delivery, f"{type(exc).__name__}: {exc}"), time.perf_counter() - started)
        else:
            self.queue.succeed(delivery, result)
            self._finish(job, "succeeded", time.perf_counter() - started)

    def _finish(self, job: Job, outcome: str, seconds: float) -> None:
        metrics.jobs.labels(job.type, outcome).inc()
        metrics.job_duration.labels(job.type).observe(seconds)
        if outcome == "failed":
            metrics.dead_letters.labels(job.type).inc()
        log.info("job finished", extra={"fields": {"job": job.id, "type": job.type, "outcome": outcome,
                                                   "seconds": round(seconds, 3)}})
