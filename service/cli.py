"""The `patchserve` command line."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from service import logs
from service.drain import Drain
from service.drain import serve as serve_until_stopped
from service.operator.commands import app as operator_app
from service.settings import Settings, SettingsError, get_settings

# vLLM's engine-core processes are spawned with this module as their __main__: they take our
# library log levels from the environment before they import vLLM.
logs.apply_library_levels()

app = typer.Typer(help="patchserve: update a served LLM while it serves.", no_args_is_help=True)
kit_app = typer.Typer(help="The kit: a small world, its base models, patches and evaluation sets.")
app.add_typer(kit_app, name="kit")
app.add_typer(operator_app, name="admin")
console = Console(stderr=True, soft_wrap=True)  # a line per fact, whatever the width


@kit_app.command("build")
def kit_build(
    out: Optional[Path] = typer.Option(None, help="Directory of the kit (default: <data_dir>/kit)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the world and of every training run."),
    force: bool = typer.Option(False, help="Rebuild even if a kit with the same hash is there."),
) -> None:
    """Build the kit (or return the cached one) and print its measured scores."""
    settings = _settings()
    target = out or settings.kit_path
    started = time.monotonic()
    manifest = ensure_kit(target, seed if seed is not None else settings.kit_seed, force=force)
    console.print(f"kit {manifest['kit_hash']} at {target.resolve()} ({time.monotonic() - started:.1f} s)")
    console.print(scores_table(manifest))


def ensure_kit(target: Path, seed: int, force: bool = False) -> dict:
    """The kit's manifest, built first unless a kit of the same hash is at `target` or in the machine's cache."""
    from service.kit import machine_cache
    from service.kit.config import KitConfig, cached

    config = KitConfig(seed=seed)
    if not force and (manifest := cached(target, config)) is not None:
        return manifest  # a cache hit imports no torch: it answers at once
    settings = _settings()
    cache_dir = (settings.kit_cache_dir or machine_cache.default_dir()) if settings.kit_cache else None
    if cache_dir is not None and not force and (manifest := machine_cache.restore(cache_dir, target, config)):
        console.print(f"kit: {manifest['kit_hash']} copied from this machine's cache ({cache_dir})")
        return manifest
    from service.kit.build import build

    manifest = build(target, config, force=force)
    if cache_dir is not None:
        machine_cache.keep(cache_dir, target, manifest)
    return manifest


def scores_table(manifest: dict) -> Table:
    """The manifest's measured scores as a table: each task on each base, alone and patched."""
    table = Table(title="kit scores (exact match)")
    columns = ["base-v1", "base-v1+patch", "base-v2", "base-v2+patch"]
    table.add_column("task")
    for c in columns:
        table.add_column(c, justify="right")
    for task, row in manifest["scores"]["tasks"].items():
        values = [row["base-v1"], row[f"base-v1+{task}"], row["base-v2"], row[f"base-v2+{task}"]]
        table.add_row(task, *(f"{v:.2f}" for v in values))
    for fact_set, row in manifest["scores"]["facts"].items():
        table.add_row(f"facts {fact_set}", f"{row['base-v1']:.2f}", "", f"{row['base-v2']:.2f}", "")
    return table


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL_HELP = f"One of {', '.join(LOG_LEVELS)} (default: settings.log_level); library logs only at debug."


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: settings.host)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default: settings.port)."),
    log_level: Optional[str] = typer.Option(None, help=LOG_LEVEL_HELP),
) -> None:
    """Serve the base with every alias at its recorded version (the kit's patches on first start)."""
    settings = _settings()
    configure_logging(log_level or settings.log_level)
    from service.api.app import create_app
    from service.bootstrap import build_worker
    from service.engines import create_engine

    store = _open_store(settings)
    if settings.seed_kit:
        from service.kit.seed import seed_registry

        manifest = ensure_kit(settings.kit_path, settings.kit_seed)
        seed_registry(store.registry, store.blobs, store.evals, settings.kit_path, manifest, store.memories)
    if settings.base_path is not None:
        _register_own_base(store, settings)
    _check_names_free(store, settings)
    base = store.registry.get_base(settings.base)
    if base is None or not base.path:
        raise typer.BadParameter(f"base {settings.base!r} is not registered with a path: register it "
                                 f"(POST /admin/bases) or give its checkpoint as PATCHSERVE_BASE_PATH")
    admin_key = _first_admin_key(store, settings)
    engine = create_engine(settings, base.path)
    worker = build_worker(store, settings) if settings.worker_in_process else None
    url = f"http://{host or settings.host}:{port or settings.port}"
    drain = Drain(on_stop=[logs.quiet_engine_on_stop])
    drain.listeners.append(lambda: console.print("patchserve: SIGTERM: draining (not ready; finishing requests in "
                                                 "flight, then stopping)"))
    app = create_app(settings, engine, store, worker, drain=drain, url=url,
                     on_ready=lambda: console.print(f"patchserve: ready on {url} (Ctrl-C stops it)"))
    aliases = ", ".join(f"{p.alias} → {p.ref}" for p in store.registry.list_aliases()) or "none"
    console.print(f"patchserve: {engine.name} engine, base {settings.base} (also as "
                  f"{', '.join(settings.base_aliases) or 'no other name'})")
    console.print(f"  aliases:   {aliases}")
    console.print(f"  registry:  {store.redis_url} (data in {settings.data_dir})")
    key_file = settings.data_dir / "admin.key"
    if admin_key:
        console.print(f"  admin key: [bold]{admin_key}[/] (shown once; kept in {key_file}, mode 0600)")
    else:
        console.print(f"  admin key: in {key_file}")
    console.print(f"  serving:   {url}/v1 (OpenAI API), {url}/admin, {url}/metrics — starting the engine …")
    # SIGTERM drains (service/drain.py), Ctrl-C stops at once; the embedded Redis stops at exit after it.
    serve_until_stopped(app, host or settings.host, port or settings.port, drain, settings.drain_grace_s,
                        settings.drain_timeout_s)


@app.command()
def router(
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: settings.host)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default: settings.router_port)."),
    log_level: Optional[str] = typer.Option(None, help=LOG_LEVEL_HELP),
) -> None:
    """One endpoint for every base: forwards each request to a live gateway hosting its base (heartbeats in Redis)."""
    settings = _settings()
    configure_logging(log_level or settings.log_level)
    from service.router.app import create_router_app

    store = _open_store(settings)
    host, port = host or settings.host, port or settings.router_port
    url = f"http://{host}:{port}"
    # The router's own endpoints answer on a local socket behind the relay (service/router/app.py).
    local_socket = str(Path(tempfile.gettempdir()) / f"patchserve-router-{os.getpid()}.sock")
    drain = Drain()
    app = create_router_app(store.replicas, store.registry, host, port, local_socket, drain,
                            close_timeout_s=settings.drain_timeout_s,
                            on_ready=lambda: console.print(f"patchserve router: ready on {url} (Ctrl-C stops it)"))
    console.print(f"patchserve router: gateways announced on {store.redis_url}; serving {url}/v1 and {url}/admin")
    try:
        serve_until_stopped(app, host, port, drain, settings.drain_grace_s, settings.drain_timeout_s, uds=local_socket)
    finally:
        Path(local_socket).unlink(missing_ok=True)


@app.command()
def worker(
    log_level: Optional[str] = typer.Option(None, help=LOG_LEVEL_HELP),
) -> None:
    """Run a worker alone (several may share one Redis): takes update jobs until stopped."""
    settings = _settings()
    configure_logging(log_level or settings.log_level)
    from prometheus_client import start_http_server

    from service import metrics
    from service.bootstrap import build_worker

    store = _open_store(settings)
    runner = build_worker(store, settings)  # imports torch and PEFT: before anything says the worker is up
    # SIGTERM (a supervisor, `kill`) lets the worker finish the job in hand and stop at its next take;
    # Ctrl-C stops it at once (the job's entry stays pending and another worker claims it). Either way
    # the embedded Redis this process started stops at exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: runner.stop())
    metrics.job_queue_lag.set_function(metrics.or_nan(store.jobs.lag_s))
    start_http_server(settings.worker_metrics_port, registry=metrics.REGISTRY)
    console.print(f"patchserve worker: jobs on {store.redis_url}, metrics on :{settings.worker_metrics_port}")
    try:
        runner.run()
    except KeyboardInterrupt:
        pass


def _fail(message: str, status: int = 1) -> NoReturn:
    """End the command with one line on stderr (an operator's mistake is not a traceback)."""
    console.print(f"patchserve: {message}", highlight=False)
    raise typer.Exit(status)


def _settings() -> Settings:
    """The settings, or one line naming each PATCHSERVE_* variable that is wrong (status 2, as a bad option)."""
    try:
        return get_settings()
    except SettingsError as exc:
        _fail(str(exc), 2)


def _open_store(settings: Settings):
    """The store on the configured Redis, or one line saying why the embedded one could not start."""
    from adapters_store.errors import EmbeddedRedisFailed
    from service.bootstrap import open_store

    try:
        return open_store(settings)
    except EmbeddedRedisFailed as exc:
        _fail(str(exc))


def configure_logging(level: str) -> None:
    """Our logs at `level` (JSON lines on stderr); other libraries' only at debug."""
    if level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    settings = _settings()
    logs.configure(level, settings.log_json)
    logs.quiet_libraries(level)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_kv_cache_gib))


def _register_own_base(store, settings) -> None:
    """Register `settings.base` from `settings.base_path` unless it is already there with the same details."""
    import json

    from adapters_store.errors import StoreError
    from adapters_store.validation import base_module_shapes

    config = settings.base_path / "config.json"
    if not config.is_file():
        raise typer.BadParameter(f"PATCHSERVE_BASE_PATH {settings.base_path} is not a checkpoint (no config.json)")
    try:
        store.registry.register_base(settings.base, settings.base_version, path=str(settings.base_path),
                                     module_shapes=base_module_shapes(json.loads(config.read_text())),
                                     actor="gateway-start")
    except StoreError as exc:
        raise typer.BadParameter(f"cannot register base {settings.base!r}: {exc.message}") from None


def _check_names_free(store, settings) -> None:
    """Refuse to start if a live gateway of another base answers to one of this gateway's names."""
    names = {settings.base, *settings.base_aliases}
    for replica in store.replicas.live():
        if replica.base != settings.base and (taken := names & set(replica.names)):
            raise typer.BadParameter(f"{', '.join(sorted(taken))} already means base {replica.base} (replica "
                                     f"{replica.id}); give this gateway other PATCHSERVE_BASE_ALIASES")


def _first_admin_key(store, settings) -> str | None:
    from service.api.auth import ensure_admin_key

    return ensure_admin_key(store.keys, settings.data_dir)


if __name__ == "__main__":
    app()
