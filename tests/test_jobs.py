"""The job queue on a real Redis: at-least-once delivery, claims of abandoned jobs, retries, dead letters."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from adapters_store.jobs import JobQueue
from service.jobs.worker import JobRefused, Worker


@pytest.fixture
def queue(store_redis_url):
    client = redis.Redis.from_url(store_redis_url)
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    q = JobQueue(client, prefix, max_attempts=3, backoff_s=0.1, claim_idle_s=0.3)
    q.ensure_group()
    yield q
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def _run_until(worker: Worker, done, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the job never finished"
        delivery = worker.queue.take(worker.consumer, block_ms=50)
        if delivery is not None:
            worker.handle(delivery)


def test_a_job_runs_once_and_reports_progress(queue):
    calls = []

    def handler(job, progress):
        calls.append(job.id)
        progress(50, "half way")
        assert queue.get(job.id).progress == 50 and queue.get(job.id).stage == "half way"
        return {"answer": job.params["x"] * 2}

    job = queue.submit("double", {"x": 21}, actor="test")
    assert queue.submit("double", {"x": 99}, job_id=job.id).params == {"x": 21}, "a resubmitted id is that job"
    worker = Worker(queue, {"double": handler}, consumer="w1")
    _run_until(worker, lambda: queue.get(job.id).done)
    done = queue.get(job.id)
    assert (done.state, done.result, done.progress, done.attempts) == ("succeeded", {"answer": 42}, 100.0, 1)
    assert calls == [job.id]
    assert queue.lag_s() == 0.0


def test_a_job_left_by_a_dead_worker_is_claimed_and_finished_once(queue):
    job = queue.submit("work", {})
    dead = queue.take("dead-worker", block_ms=100)  # taken, then the worker "dies": never acknowledged
    assert dead is not None and dead.job.id == job.id
    queue.start(dead)
    assert queue.lag_s() > 0
    runs = []
    worker = Worker(queue, {"work": lambda j, p: runs.append(j.id) or {"ok": True}}, consumer="w2")
    assert worker.queue.take("w2", block_ms=50) is None, "not claimed while the first worker may still be alive"
    time.sleep(0.4)
    _run_until(worker, lambda: queue.get(job.id).done)
    assert runs == [job.id] and queue.get(job.id).attempts == 2
    # The dead worker's late answer, if it ever came, would find the job done and only acknowledge it.
    redelivered = queue.get(job.id)
    assert redelivered.done


def test_failures_are_retried_with_backoff_then_dead_lettered(queue):
    attempts = []

    def flaky(job, progress):
        attempts.append(time.monotonic())
        raise RuntimeError("engine on fire")

    job = queue.submit("flaky", {})
    worker = Worker(queue, {"flaky": flaky}, consumer="w3")
    _run_until(worker, lambda: queue.get(job.id).state == "failed")
    assert len(attempts) == 3
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, f"backoff doubles: {gaps}"
    dead = queue.dead_letters()
    assert [d["job"] for d in dead] == [job.id] and "engine on fire" in dead[0]["error"]


def test_a_refused_job_is_not_retried(queue):
    job = queue.submit("refuse", {})
    worker = Worker(queue, {"refuse": lambda j, p: (_ for _ in ()).throw(JobRefused("no such version"))},
                    consumer="w4")
    _run_until(worker, lambda: queue.get(job.id).done)
    assert queue.get(job.id).state == "failed" and queue.get(job.id).attempts == 1
    unknown = queue.submit("nobody-handles-this", {})
    _run_until(worker, lambda: queue.get(unknown.id).done)
    assert "no handler" in queue.get(unknown.id).error
