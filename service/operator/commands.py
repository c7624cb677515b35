"""`patchserve admin …`: subcommands by noun (patches, aliases, memories, jobs, reports, merges, bases, keys, audit,
cluster).

Exit status: 0 done; 1 refused or failed (one line on stderr); 3 a job finished but its gate refused
the candidate (so a script can tell "not moved" from "broken").
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from service.operator import render
from service.operator.client import AdminClient, OperatorError
from service.settings import SettingsError, get_settings

GATE_REFUSED = 3
_TERMINAL = ("succeeded", "failed")
_REF = re.compile(r"([a-z0-9][a-z0-9-]*)@([0-9]+)")

Json = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON (for scripts).")]
Reason = Annotated[str, typer.Option(help="Why: kept in the audit log.")]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the queued job to its end.")]

app = typer.Typer(help="Operate a running server through its admin API (key: PATCHSERVE_ADMIN_KEY or "
                       "<data_dir>/admin.key; server: PATCHSERVE_URL or host:port).", no_args_is_help=True)
patches = typer.Typer(help="Patches and their versions.", no_args_is_help=True)
aliases = typer.Typer(help="Aliases: what each name serves, moves and their history.", no_args_is_help=True)
jobs = typer.Typer(help="Worker jobs: list, show, watch.", no_args_is_help=True)
reports = typer.Typer(help="Compatibility reports of versions.", no_args_is_help=True)
merges = typer.Typer(help="Merging patches into one version.", no_args_is_help=True)
bases = typer.Typer(help="Base releases.", no_args_is_help=True)
keys = typer.Typer(help="API keys.", no_args_is_help=True)
memories = typer.Typer(help="Side memories (knowledge edits): edit, show, roll back, revoke.", no_args_is_help=True)
for sub, name in ((patches, "patches"), (aliases, "aliases"), (memories, "memories"), (jobs, "jobs"),
                  (reports, "reports"), (merges, "merges"), (bases, "bases"), (keys, "keys")):
    app.add_typer(sub, name=name)


@app.callback()
def connect(ctx: typer.Context,
            url: Annotated[Optional[str], typer.Option(help="The server (default: PATCHSERVE_URL).")] = None,
            key: Annotated[Optional[str], typer.Option(help="Admin key (default: PATCHSERVE_ADMIN_KEY).")] = None,
            ) -> None:
    """Operate a running server through its admin API."""
    ctx.obj = lambda: AdminClient.from_settings(get_settings(), url, key)


def _run(ctx: typer.Context, action: Callable[[AdminClient], Any]) -> Any:
    """`action` on a client; an OperatorError ends the command with its one line and status 1."""
    try:
        with ctx.obj() as client:
            return action(client)
    except (OperatorError, SettingsError) as exc:
        render.err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


# -- patches ---------------------------------------------------------------------------------------------
@patches.command("list")
def patches_list(ctx: typer.Context, json_: Json = False) -> None:
    """Every patch: its versions and the aliases on it."""
    found = _run(ctx, lambda c: c.get("/patches"))
    rows = [{"patch": p["name"], "versions": len(p["versions"]),
             "latest": p["versions"][-1]["ref"] if p["versions"] else None,
             "aliases": ", ".join(p["aliases"])} for p in found]
    render.emit(found if json_ else rows, json_, "patches")


@patches.command("show")
def patches_show(ctx: typer.Context, name: str, json_: Json = False) -> None:
    """One patch's versions (base, origin, parents) and the aliases on it."""
    found = _run(ctx, lambda c: c.get(f"/patches/{name}"))
    if json_:
        return render.emit(found, True)
    rows = [{**v, "parents": ", ".join(v["parents"])} for v in found["versions"]]
    render.out.print(render.rows_table(rows, ["ref", "base", "origin", "parents", "created_at", "created_by"],
                                       f"{name} (aliases: {', '.join(found['aliases']) or 'none'})"))


@patches.command("upload")
def patches_upload(ctx: typer.Context, name: str,
                   directory: Annotated[Path, typer.Argument(help="A PEFT adapter directory (adapter_config.json "
                                                                    "+ adapter_model.safetensors).")],
                   base: Annotated[Optional[str], typer.Option(help="Its base (default: the served one).")] = None,
                   activate: Annotated[bool, typer.Option(help="Then move the alias to it (gated).")] = False,
                   alias: Annotated[Optional[str], typer.Option(help="The alias to move (default: NAME).")] = None,
                   reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Upload a new version of patch NAME; with --activate, move the alias through its gate."""
    paths = [directory / "adapter_config.json", directory / "adapter_model.safetensors"]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        render.err.print(f"[red]error:[/] {directory} has no {', '.join(missing)}", highlight=False)
        raise typer.Exit(1)
    fields = {k: v for k, v in {"base": base, "reason": reason, "alias": alias,
                                "activate": "true" if activate else None}.items() if v}

    def upload(client: AdminClient) -> dict:
        with paths[0].open("rb") as config, paths[1].open("rb") as weights:
            return client.post(f"/patches/{name}/versions", data=fields,
                               files=[("files", (paths[0].name, config)), ("files", (paths[1].name, weights))])

    record = _run(ctx, upload)
    activation = record.pop("activation", None)
    if json_:
        render.emit(record, True)
    else:
        meta = record["meta"]
        render.out.print(f"uploaded [bold]{record['ref']}[/] on {record['base']}: rank {meta.get('rank')}, "
                         f"{', '.join(meta.get('target_modules', []))}, {meta.get('weights_bytes', 0):,} bytes")
    if activation is not None:
        _moved(ctx, activation, wait, json_)


# -- aliases ---------------------------------------------------------------------------------------------
@aliases.command("list")
def aliases_list(ctx: typer.Context, json_: Json = False) -> None:
    """Every alias and the version it serves."""
    found = _run(ctx, lambda c: c.get("/aliases"))
    render.emit(found, json_, "aliases", ["alias", "ref", "base", "action", "updated_at", "updated_by"])


@aliases.command("history")
def aliases_history(ctx: typer.Context, alias: str, json_: Json = False) -> None:
    """An alias's moves, oldest first: who, when, from what to what, and why."""
    found = _run(ctx, lambda c: c.get(f"/aliases/{alias}"))
    if json_:
        return render.emit(found, True)
    render.out.print(f"{alias} → [bold]{found['ref']}[/] on {found['base']}")
    render.out.print(render.rows_table(found["history"], ["at", "action", "from_ref", "to_ref", "actor", "reason"],
                                       f"history of {alias}"))


@aliases.command("activate")
def aliases_activate(ctx: typer.Context, alias: str, version: int,
                     patch: Annotated[Optional[str], typer.Option(help="Default: named like ALIAS.")] = None,
                     force: Annotated[bool, typer.Option(help="Skip the gate (needs --reason).")] = False,
                     reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Point ALIAS at VERSION: at once where no gate applies, else through evaluate → gate → move."""
    body = {"version": version, "patch": patch, "reason": reason, "force": force}
    _moved(ctx, _run(ctx, lambda c: c.post(f"/aliases/{alias}/activate", {k: v for k, v in body.items()
                                                                            if v is not None})), wait, json_)


@aliases.command("rollback")
def aliases_rollback(ctx: typer.Context, alias: str,
                     to: Annotated[Optional[int], typer.Option(help="The version (default: the one before).")] = None,
                     reason: Reason = "", json_: Json = False) -> None:
    """Move ALIAS back (a pointer move, no evaluation): to the version before the last move, or --to."""
    body = {"reason": reason, **({"version": to} if to is not None else {})}
    moved = _run(ctx, lambda c: c.post(f"/aliases/{alias}/rollback", body))
    render.emit(moved, json_, f"{alias} → {moved['ref']}")


@aliases.command("evalset")
def aliases_evalset(ctx: typer.Context, alias: str,
                    rows: Annotated[Path, typer.Argument(help='JSONL of {"prompt", "reference"} rows.')],
                    metric: Annotated[str, typer.Option(help="exact_match or rouge_l.")] = "exact_match",
                    json_: Json = False) -> None:
    """Attach an evaluation set to ALIAS: its gate compares candidates on it."""
    data = _read(rows)
    found = _run(ctx, lambda c: c.put(f"/aliases/{alias}/evalset", content=data, params={"metric": metric}))
    render.emit(found, json_, f"evaluation set of {alias}")


@aliases.command("prompts")
def aliases_prompts(ctx: typer.Context, alias: str,
                    rows: Annotated[Path, typer.Argument(help='JSONL of {"prompt"} rows (no references).')],
                    json_: Json = False) -> None:
    """Attach distillation prompts to ALIAS (what a repair trains on; never its evaluation items)."""
    data = _read(rows)
    render.emit(_run(ctx, lambda c: c.put(f"/aliases/{alias}/prompts", content=data)), json_,
                f"distillation prompts of {alias}")


@aliases.command("repair")
def aliases_repair(ctx: typer.Context, alias: str,
                   base: Annotated[str, typer.Option(help="The new base to repair the alias's patch for.")],
                   reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Repair ALIAS's patch for a new base by distillation from its current version; moved if it passes."""
    answer = _run(ctx, lambda c: c.post(f"/aliases/{alias}/repair", {"base": base, "reason": reason}))
    _follow(ctx, answer["job"], wait, json_)


def _moved(ctx: typer.Context, answer: dict, wait: bool, json_: bool) -> None:
    """An activation's answer: the alias (moved at once) or the gated job, followed when `wait`."""
    if "job" not in answer:
        return render.emit(answer, json_, f"{answer['alias']} → {answer['ref']}")
    _follow(ctx, answer["job"], wait, json_)


def _follow(ctx: typer.Context, job: dict, wait: bool, json_: bool) -> None:
    if not wait:
        render.emit(job, json_, f"job {job['id']} queued (follow it: patchserve admin jobs watch {job['id']})")
        return
    _finish(_run(ctx, lambda c: watch(c, job["id"], show_progress=not json_)), json_)


# -- memories --------------------------------------------------------------------------------------------
@memories.command("list")
def memories_list(ctx: typer.Context, json_: Json = False) -> None:
    """Every side memory: its base, what it is attached to, the version it serves and its edits."""
    found = _run(ctx, lambda c: c.get("/memories"))
    render.emit(found, json_, "memories", ["name", "base", "target", "ref", "edits", "updated_at", "updated_by"])


@memories.command("show")
def memories_show(ctx: typer.Context, name: str, json_: Json = False) -> None:
    """A memory's versions (Rel/Gen/Loc over every edit, the gate's verdict) and its moves."""
    found = _run(ctx, lambda c: c.get(f"/memories/{name}"))
    if json_:
        return render.emit(found, True)
    render.out.print(f"{name} on {found['base']}, attached to {found['target']}: serves [bold]{found['ref']}[/]")
    rows = [{"ref": v["ref"], "parent": v["parent"], "edits": v["edits"], "added": len(v["added"]),
             "revoked": ", ".join(v["revoked"]), **{k: (v["report"].get("all") or {}).get(k)
                                                   for k in ("rel", "gen", "loc")},
             "ppl ratio": v["report"].get("perplexity_ratio"),
             "gate": (v["report"].get("gate") or {}).get("passed")} for v in found["versions"]]
    render.out.print(render.rows_table(rows, list(rows[0]) if rows else ["ref"], f"versions of {name}"))
    render.out.print(render.rows_table(found["history"], ["at", "action", "from_version", "to_version", "actor",
                                                          "reason"], f"history of {name}"))


@memories.command("edit")
def memories_edit(ctx: typer.Context, name: str,
                  edits: Annotated[Path, typer.Argument(help='JSONL of {"prompt", "target", "paraphrases"?, '
                                                             '"locality"?} rows.')],
                  first: Annotated[Optional[int], typer.Option(min=1, help="Only the file's first N rows.")] = None,
                  reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Write a batch of facts into NAME: trained on top of the served version, measured, gated, activated."""
    rows = [json.loads(line) for line in _read(edits).decode().splitlines() if line.strip()][:first]
    answer = _run(ctx, lambda c: c.post(f"/memories/{name}/edits", {"edits": rows, "reason": reason}))
    _follow(ctx, answer["job"], wait, json_)


@memories.command("rollback")
def memories_rollback(ctx: typer.Context, name: str,
                      to: Annotated[Optional[int], typer.Option(help="The version (0: none; default: the one "
                                                                     "before).")] = None,
                      reason: Reason = "", json_: Json = False) -> None:
    """Move NAME back (a pointer move, never gated): to the version before the last move, or --to."""
    body = {"reason": reason, **({"version": to} if to is not None else {})}
    moved = _run(ctx, lambda c: c.post(f"/memories/{name}/rollback", body))
    render.emit(moved, json_, f"{name} → {moved['ref'] or 'no version'}")


@memories.command("revoke")
def memories_revoke(ctx: typer.Context, name: str, edit: Annotated[str, typer.Argument(help="An edit id, like e7.")],
                    reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Take one edit back: a new version without it (trained from before it), measured, gated, activated."""
    answer = _run(ctx, lambda c: c.post(f"/memories/{name}/revoke", {"edit": edit, "reason": reason}))
    _follow(ctx, answer["job"], wait, json_)


# -- jobs ------------------------------------------------------------------------------------------------
@jobs.command("list")
def jobs_list(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
              json_: Json = False) -> None:
    """The latest jobs, newest first."""
    found = _run(ctx, lambda c: c.get("/jobs", limit=limit))
    render.emit(found, json_, "jobs", ["id", "type", "state", "progress", "stage", "attempts", "updated_at", "actor"])


@jobs.command("show")
def jobs_show(ctx: typer.Context, job_id: str, json_: Json = False) -> None:
    """One job: state, progress, and its result or error."""
    _finish(_run(ctx, lambda c: c.get(f"/jobs/{job_id}")), json_)


@jobs.command("watch")
def jobs_watch(ctx: typer.Context, job_id: str, json_: Json = False) -> None:
    """Follow a job with a progress bar until it ends, then print its result."""
    _finish(_run(ctx, lambda c: watch(c, job_id, show_progress=not json_)), json_)


def watch(client: AdminClient, job_id: str, show_progress: bool = True, poll_s: float = 0.3) -> dict:
    """Poll a job until it ends (a progress bar on stderr meanwhile); the ended job."""
    job = client.get(f"/jobs/{job_id}")
    with Progress(TextColumn("{task.fields[job]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=render.err,
                  disable=not show_progress) as bar:
        task = bar.add_task(job["stage"] or job["state"], total=100, job=f"{job['type']} {job['id']}")
        while True:
            bar.update(task, completed=job["progress"], description=job["stage"] or job["state"])
            if job["state"] in _TERMINAL:
                return job
            time.sleep(poll_s)
            job = client.get(f"/jobs/{job_id}")


def _finish(job: dict, json_: bool) -> None:
    """Print an ended (or running) job; its exit status says failed (1) or refused by its gate (3)."""
    result = job.get("result") or {}
    if json_:
        render.emit(job, True)
    else:
        render.out.print(f"job {job['id']} ({job['type']}): [bold]{job['state']}[/] "
                         f"after {job['attempts']} attempt(s){' — ' + job['stage'] if job['stage'] else ''}")
        if job.get("error"):
            render.out.print(f"[red]error:[/] {job['error']}", highlight=False)
        if result:
            render.show(result, "result")
    if job["state"] == "failed":
        raise typer.Exit(1)
    if result.get("activated") is False or (result.get("gate") or {}).get("passed") is False:
        raise typer.Exit(GATE_REFUSED)


# -- reports ---------------------------------------------------------------------------------------------
@reports.command("show")
def reports_show(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="A version, like sentiment@2.")],
                 items: Annotated[bool, typer.Option(help="Also list every evaluation item.")] = False,
                 json_: Json = False) -> None:
    """The compatibility report of a version (its latest evaluation) with the gate's verdict."""
    name, version = _ref(ref)
    found = _run(ctx, lambda c: c.get(f"/patches/{name}/versions/{version}/compat", items=str(items).lower()))
    if json_:
        return render.emit(found, True)
    render.report(found, found.get("gate"))
    if items:
        render.out.print(render.rows_table(found["items"], ["prompt", "reference", "old", "new", "d"], "items"))


# -- merges ----------------------------------------------------------------------------------------------
@merges.command("create")
def merges_create(ctx: typer.Context,
                  sources: Annotated[list[str], typer.Argument(help="Versions to merge, like sentiment@1 qa@1.")],
                  name: Annotated[str, typer.Option(help="The patch the merge is registered under.")],
                  rank: Annotated[int, typer.Option(help="Rank of the merged adapter.")],
                  method: Annotated[str, typer.Option(help="linear, ties, dare_ties, breadcrumbs, consensus, "
                                                           "orthogonal or distill.")] = "ties",
                  density: Annotated[Optional[float], typer.Option(help="ties, dare_ties.")] = None,
                  weights: Annotated[Optional[str], typer.Option(help="One per source, comma-separated.")] = None,
                  lam: Annotated[Optional[float], typer.Option(help="λ of the TALL masks (consensus, --tall).")] = None,
                  init: Annotated[Optional[str], typer.Option(help="distill: the start (auto, a method or a "
                                                                   "source).")] = None,
                  steps: Annotated[Optional[int], typer.Option(help="distill: training steps.")] = None,
                  tall: Annotated[bool, typer.Option(help="Also keep TALL storage and rebuild each source from "
                                                          "it as its next version.")] = False,
                  tall_store: Annotated[str, typer.Option(help="fitted (shared ΔW and masks fitted to the "
                                                                "sources) or masks (λ-masks over the merge).")]
                  = "fitted",
                  reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Merge SOURCES into a new version of --name, with a retention report per source alias."""
    params: dict[str, Any] = {"density": density, "lam": lam, "init": init, "steps": steps}
    if weights:
        try:
            params["weights"] = [float(w) for w in weights.split(",")]
        except ValueError:
            raise typer.BadParameter(f"{weights!r} is not comma-separated numbers", param_hint="--weights") from None
    body = {"sources": sources, "method": method, "rank": rank, "name": name, "tall": tall, "tall_store": tall_store,
            "reason": reason,
            "params": {k: v for k, v in params.items() if v is not None}}
    _follow(ctx, _run(ctx, lambda c: c.post("/merges", body))["job"], wait, json_)


# -- bases -----------------------------------------------------------------------------------------------
@bases.command("list")
def bases_list(ctx: typer.Context, json_: Json = False) -> None:
    """Registered base releases."""
    render.emit(_run(ctx, lambda c: c.get("/bases")), json_, "bases", ["name", "version", "path", "created_at"])


@bases.command("register")
def bases_register(ctx: typer.Context, name: str,
                   version: Annotated[str, typer.Option(help="The release's own version string.")],
                   path: Annotated[str, typer.Option(help="Its checkpoint directory on the server.")],
                   move: Annotated[bool, typer.Option(help="Move each alias whose carried patch passes.")] = False,
                   repair: Annotated[bool, typer.Option(help="Repair each carried patch that fails.")] = False,
                   force: Annotated[bool, typer.Option(help="Move even if no live gateway hosts the base yet "
                                                            "(needs --reason).")] = False,
                   reason: Reason = "", wait: Wait = True, json_: Json = False) -> None:
    """Register a base release and carry every alias's patch to it (PortLLM), measured and gated."""
    answer = _run(ctx, lambda c: c.post("/bases", {"name": name, "version": version, "path": path, "move": move,
                                                   "repair": repair, "force": force, "reason": reason}))
    _follow(ctx, answer["job"], wait, json_)


# -- cluster ---------------------------------------------------------------------------------------------
@app.command("cluster")
def cluster(ctx: typer.Context, json_: Json = False) -> None:
    """Live replicas (from their heartbeats): base, versions resident, last beat; bases no replica serves."""
    found = _run(ctx, lambda c: c.get("/cluster"))
    if json_:
        return render.emit(found, True)
    rows = [{"replica": r["id"], "base": r["base"], "url": r["url"],
             "state": "draining" if r["draining"] else "ready" if r["ready"] else "starting",
             "versions": ", ".join(r["versions"]), "in_flight": r["in_flight"],
             "heartbeat_age_s": r["heartbeat_age_s"]} for r in found["replicas"]]
    render.emit(rows, False, "replicas")
    if found["unserved_bases"]:
        render.err.print(f"[red]no live replica serves[/] {', '.join(found['unserved_bases'])} "
                         f"(aliases refused: {', '.join(found['aliases_unserved'])})", highlight=False)


# -- keys ------------------------------------------------------------------------------------------------
@keys.command("list")
def keys_list(ctx: typer.Context, json_: Json = False) -> None:
    """API keys (never their secrets)."""
    render.emit(_run(ctx, lambda c: c.get("/keys")), json_, "keys", ["id", "name", "role", "created_at", "created_by"])


@keys.command("create")
def keys_create(ctx: typer.Context, name: str,
                role: Annotated[str, typer.Option(help="admin or inference.")] = "inference",
                json_: Json = False) -> None:
    """Create a key; its secret is printed once."""
    created = _run(ctx, lambda c: c.post("/keys", {"role": role, "name": name}))
    if json_:
        return render.emit(created, True)
    render.out.print(f"key {created['id']} ({created['role']}) for {created['name']}: [bold]{created['key']}[/]")
    render.err.print("the secret is shown once; keep it now")


@keys.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str, json_: Json = False) -> None:
    """Revoke a key by its id."""
    render.emit(_run(ctx, lambda c: c.delete(f"/keys/{key_id}")), json_, "revoked")


# -- audit -----------------------------------------------------------------------------------------------
@app.command("audit")
def audit(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
          since: Annotated[Optional[str], typer.Option(help="An entry id or a Unix time.")] = None,
          json_: Json = False) -> None:
    """The audit log: every change, who made it and why."""
    found = _run(ctx, lambda c: c.get("/audit", limit=limit, since=since))
    render.emit(found, json_, "audit", ["at", "action", "target", "from_ref", "to_ref", "actor", "reason"])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        render.err.print(f"[red]error:[/] cannot read {path}: {exc.strerror}", highlight=False)
        raise typer.Exit(1) from None


def _ref(ref: str) -> tuple[str, int]:
    m = _REF.fullmatch(ref)
    if m is None:
        raise typer.BadParameter(f"{ref!r} is not a version like sentiment@2")
    return m[1], int(m[2])
