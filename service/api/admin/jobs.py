"""Worker jobs: state, attempts, progress, result or error; dead letters."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query

from service.api.admin import protocol as a
from service.api.admin.context import AdminContext
from service.api.errors import APIError


def routes(router: APIRouter, ctx: AdminContext) -> None:
    """Add the jobs routes to the /admin router."""
    jobs = ctx.jobs

    @router.get("/jobs")
    async def jobs_list(limit: int = Query(50, ge=1, le=500)) -> list[a.JobView]:
        return [a.JobView.of(j) for j in await asyncio.to_thread(jobs.recent, limit)]

    @router.get("/jobs/dead-letters")
    async def dead_letters(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        return await asyncio.to_thread(jobs.dead_letters, limit)

    @router.get("/jobs/{job_id}")
    async def job_show(job_id: str) -> a.JobView:
        job = await asyncio.to_thread(jobs.get, job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r}", code="not_found")
        return a.JobView.of(job)
