"""The `patchserve` command line."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from service.settings import get_settings

app = typer.Typer(help="patchserve: update a served LLM while it serves.", no_args_is_help=True)
kit_app = typer.Typer(help="The kit: a small world, its base models, patches and evaluation sets.")
app.add_typer(kit_app, name="kit")
console = Console(stderr=True)


@kit_app.command("build")
def kit_build(
    out: Optional[Path] = typer.Option(None, help="Directory of the kit (default: <data_dir>/kit)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the world and of every training run."),
    force: bool = typer.Option(False, help="Rebuild even if a kit with the same hash is there."),
) -> None:
    """Build the kit (or return the cached one) and print its measured scores."""
    settings = get_settings()
    target = out or settings.kit_path
    started = time.monotonic()
    manifest = ensure_kit(target, seed if seed is not None else settings.kit_seed, force=force)
    console.print(f"kit {manifest['kit_hash']} at {target.resolve()} ({time.monotonic() - started:.1f} s)")
    console.print(scores_table(manifest))


def ensure_kit(target: Path, seed: int, force: bool = False) -> dict:
    """The kit's manifest, built first unless a kit of the same hash is already at `target`."""
    from service.kit.config import KitConfig, cached

    config = KitConfig(seed=seed)
    if not force and (manifest := cached(target, config)) is not None:
        return manifest  # a cache hit imports no torch: it answers at once
    from service.kit.build import build

    return build(target, config, force=force)


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


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Address to listen on (default: settings.host)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default: settings.port)."),
) -> None:
    """Build the kit if needed, then serve it: base-v1 as `tiny`, and the kit's patches by name."""
    import uvicorn

    from service import logs
    from service.api.app import create_app
    from service.engines import create_engine
    from service.kit_models import kit_resolver

    settings = get_settings()
    logs.configure(settings.log_level, settings.log_json)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.log_level)  # quiet by default, like ours
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_kv_cache_gib))
    manifest = ensure_kit(settings.kit_path, settings.kit_seed)
    resolver = kit_resolver(settings.kit_path, manifest)
    engine = create_engine(settings, str(settings.kit_path / "base-v1"))
    app = create_app(settings, engine, resolver)
    console.print(f"patchserve: {engine.name} engine, models {', '.join(resolver.models())} "
                  f"on http://{host or settings.host}:{port or settings.port}")
    uvicorn.run(app, host=host or settings.host, port=port or settings.port, log_level="warning",
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    app()
