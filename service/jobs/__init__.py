"""Update jobs run by the worker: one module per job type, each a function of (context, job, progress)."""

from __future__ import annotations

from functools import partial

from service.jobs.activate import activate
from service.jobs.context import JobContext
from service.jobs.edit import edit, revoke
from service.jobs.evaluate import evaluate
from service.jobs.extract import extract
from service.jobs.kv_policy import kv_policy
from service.jobs.merge import merge
from service.jobs.port import port
from service.jobs.repair import repair
from service.jobs.worker import Handler

JOB_TYPES = {"evaluate": evaluate, "activate": activate, "extract": extract, "port": port, "merge": merge,
             "repair": repair, "edit": edit, "revoke": revoke, "kv_policy": kv_policy}


def handlers(ctx: JobContext) -> dict[str, Handler]:
    """Every job type's handler, bound to `ctx`."""
    return {name: partial(run, ctx) for name, run in JOB_TYPES.items()}
