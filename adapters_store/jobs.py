"""Jobs on a Redis Stream: at-least-once delivery to a consumer group, retries with backoff, dead letters.

A job is a record (`job:<id>`, a hash) plus an entry in the `jobs` stream that carries its id. Workers
read entries through one consumer group; an entry is acknowledged only in the same transaction that
records the job's outcome, so a worker killed mid-job leaves its entry pending, and another worker
claims it once it has been idle for `claim_idle_s` (a running job keeps its entry fresh through its
progress reports). Handlers are keyed by job id: a job already marked done is acknowledged, not rerun.

A failed attempt is retried after `backoff_s * 2**(attempt-1)` (the job waits in the `jobs:delayed`
sorted set, and is moved back to the stream by whichever worker sees it due); after `max_attempts`
it goes to the `jobs:dead` stream with its last error.

Keys, under the prefix: jobs (stream), jobs:delayed (zset id → due time), jobs:dead (stream),
job:<id> (hash), jobs:recent (list of ids, newest first, capped).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis

GROUP = "workers"
_RECENT = 500

# KEYS: delayed, stream.  ARGV: now.  Moves due jobs back to the stream, atomically (no job twice).
_PROMOTE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('XADD', KEYS[2], '*', 'job', id)
  end
end
return #due
"""

# KEYS: job hash, stream, recent.  ARGV: id, recent cap, then the hash's field/value pairs.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
return 1
"""


@dataclass
class Job:
    id: str
    type: str
    params: dict
    state: str = "queued"
    attempts: int = 0
    max_attempts: int = 3
    progress: float = 0.0  # percent
    stage: str = "queued"
    result: dict | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    actor: str = "system"

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed")


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to this worker: the job, and the entry to acknowledge."""

    entry_id: str
    job: Job


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class JobQueue:
    """Submit jobs, read their state, and (for workers) take, report on and finish them."""

    def __init__(self, client: redis.Redis, prefix: str = "ps:", *, max_attempts: int = 3, backoff_s: float = 1.0,
                 claim_idle_s: float = 30.0):
        self.r = client
        self.prefix = prefix
        self.max_attempts, self.backoff_s, self.claim_idle_s = max_attempts, backoff_s, claim_idle_s
        self.stream, self.delayed, self.dead = prefix + "jobs", prefix + "jobs:delayed", prefix + "jobs:dead"
        self._promote = client.register_script(_PROMOTE_DUE)
        self._submit = client.register_script(_SUBMIT)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if they do not exist yet."""
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- submitting and reading ----------------------------------------------------------------------
    def submit(self, type_: str, params: dict, actor: str = "system", job_id: str | None = None) -> Job:
        """Record a job and put it on the stream (one transaction); `job_id` makes a resubmission a no-op."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        job = Job(id=job_id, type=type_, params=params, max_attempts=self.max_attempts, created_at=now,
                  updated_at=now, actor=actor)
        flat = [x for kv in self._fields(job).items() for x in kv]
        created = self._submit(keys=[self._key(job_id), self.stream, self.prefix + "jobs:recent"],
                               args=[job_id, _RECENT, *flat])
        return job if created else self.get(job_id)  # the same id was submitted before: it is that job

    def get(self, job_id: str) -> Job | None:
        """The job's record, or None."""
        raw = self.r.hgetall(self._key(job_id))
        if not raw or b"type" not in raw:
            return None
        f = {_s(k): _s(v) for k, v in raw.items()}
        return Job(id=f["id"], type=f["type"], params=json.loads(f["params"]), state=f["state"],
                   attempts=int(f["attempts"]), max_attempts=int(f["max_attempts"]), progress=float(f["progress"]),
                   stage=f["stage"], result=json.loads(f["result"]) if f.get("result") else None,
                   error=f.get("error") or None, created_at=float(f["created_at"]),
                   updated_at=float(f["updated_at"]), actor=f.get("actor", "system"))

    def recent(self, limit: int = 50) -> list[Job]:
        """The newest jobs first."""
        ids = [_s(i) for i in self.r.lrange(self.prefix + "jobs:recent", 0, limit - 1)]
        return [j for j in (self.get(i) for i in ids) if j is not None]

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """Jobs that failed every attempt: {id, job, type, error, at}, oldest first."""
        return [{"id": _s(eid), **{_s(k): _s(v) for k, v in fields.items()}}
                for eid, fields in self.r.xrange(self.dead, count=limit)]

    def lag_s(self) -> float:
        """Age of the oldest job waiting to be taken or finished (0 when none): how far behind the workers are."""
        oldest = None
        pending = self.r.xpending(self.stream, GROUP) if self.r.exists(self.stream) else None
        if pending and pending.get("pending"):
            oldest = _s(pending["min"])
        info = self._group_info()
        if info is not None and info.get("lag"):
            after = self.r.xrange(self.stream, min="(" + _s(info["last-delivered-id"]), count=1)
            if after and (oldest is None or _s(after[0][0]) < oldest):
                oldest = _s(after[0][0])
        if oldest is None:
            return 0.0
        return max(0.0, time.time() - int(oldest.split("-")[0]) / 1000)

    def _group_info(self) -> dict | None:
        try:
            groups = self.r.xinfo_groups(self.stream)
        except redis.ResponseError:
            return None
        return next(({_s(k): v for k, v in g.items()} for g in groups if _s(g["name"]) == GROUP), None)

    # -- working ---------------------------------------------------------------------------------------
    def take(self, consumer: str, block_ms: int = 1000) -> Delivery | None:
        """The next job for `consumer`: a due retry, an entry left by a dead worker, or a new one."""
        self._promote(keys=[self.delayed, self.stream], args=[repr(time.time())])
        claimed = self.r.xautoclaim(self.stream, GROUP, consumer, min_idle_time=int(self.claim_idle_s * 1000),
                                    start_id="0-0", count=1)
        entries = claimed[1] if claimed else []
        if not entries:
            read = self.r.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
            entries = read[0][1] if read else []
        for entry_id, fields in entries:
            if not fields:  # trimmed away; nothing to do
                self.r.xack(self.stream, GROUP, entry_id)
                continue
            job = self.get(_s(fields[b"job"]))
            if job is None:
                self.r.xack(self.stream, GROUP, entry_id)
                continue
            return Delivery(entry_id=_s(entry_id), job=job)
        return None

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge an entry whose job was already recorded done (a redelivery)."""
        self.r.xack(self.stream, GROUP, delivery.entry_id)

    def start(self, delivery: Delivery) -> Job:
        """Mark the job running (one more attempt) and return it."""
        job = delivery.job
        self.r.hset(self._key(job.id), mapping={"state": "running", "attempts": job.attempts + 1,
                                                 "stage": "started", "updated_at": repr(time.time())})
        job.state, job.attempts = "running", job.attempts + 1
        return job

    def progress(self, delivery: Delivery, consumer: str, percent: float, stage: str) -> None:
        """Report progress; also tells the group this worker is alive, so its entry is not claimed."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hset(self._key(delivery.job.id), mapping={"progress": round(float(percent), 1), "stage": stage,
                                                           "updated_at": repr(time.time())})
            pipe.xclaim(self.stream, GROUP, consumer, 0, [delivery.entry_id], justid=True)
            pipe.execute()

    def succeed(self, delivery: Delivery, result: dict) -> None:
        """Record the result and acknowledge the entry, together."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(delivery.job.id), mapping={
                "state": "succeeded", "progress": 100.0, "stage": "done", "result": json.dumps(result),
                "error": "", "updated_at": repr(time.time())})
            pipe.xack(self.stream, GROUP, delivery.entry_id)
            pipe.execute()

    def fail(self, delivery: Delivery, error: str, retry: bool = True) -> str:
        """Record a failed attempt: retried later (returns 'retrying') or dead-lettered ('failed')."""
        job, now = delivery.job, time.time()
        attempts = int(self.r.hget(self._key(job.id), "attempts") or job.attempts)
        with self.r.pipeline(transaction=True) as pipe:
            if retry and attempts < job.max_attempts:
                state = "retrying"
                due = now + self.backoff_s * 2 ** (attempts - 1)
                pipe.zadd(self.delayed, {job.id: due})
            else:
                state = "failed"
                pipe.xadd(self.dead, {"job": job.id, "type": job.type, "error": error[:2000], "at": repr(now)})
            pipe.hset(self._key(job.id), mapping={"state": state, "error": error[:2000], "stage": state,
                                                  "updated_at": repr(now)})
            pipe.xack(self.stream, GROUP, delivery.entry_id)
            pipe.execute()
        return state

    def _fields(self, job: Job) -> dict:
        return {"id": job.id, "type": job.type, "params": json.dumps(job.params), "state": job.state,
                "attempts": job.attempts, "max_attempts": job.max_attempts, "progress": job.progress,
                "stage": job.stage, "result": json.dumps(job.result) if job.result is not None else "",
                "error": job.error or "", "created_at": repr(job.created_at), "updated_at": repr(job.updated_at),
                "actor": job.actor}
