"""Server settings, read from ``KILN_*`` environment variables (pydantic-settings).

Built once at start-up and passed into ``create_app``; never a module global.
A wrong value fails start-up with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.admission import QueuePolicy


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="port of the KServe v2 gRPC service (Triton's GRPCInferenceService and "
        "grpc.health.v1) on the same host as HTTP; 0 turns gRPC off",
    )
    store: Path = Path("data/store")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = False
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="uvicorn's event loop; auto: uvloop when installed (the fastest). Under "
        "overload uvloop accepts one new connection per loop turn, so a burst of new "
        "connections (health probes behind them) can wait seconds; asyncio accepts them "
        "at once, at about a quarter more CPU per request",
    )

    # Cluster mode: several replicas on one store agree through a PostgreSQL catalog
    catalog_url: str | None = Field(
        None,
        description="postgresql://… URL of the catalog; unset: a single server owns the store",
    )
    catalog_url_file: Path | None = Field(
        None,
        description="file holding the catalog URL (a mounted Secret); read when KILN_CATALOG_URL is unset",
    )
    catalog_lease_ttl_s: float = Field(
        30.0, ge=0.5, le=3600, description="build lease and replica heartbeat lifetime"
    )
    catalog_resync_s: float = Field(
        5.0, ge=0.1, le=3600, description="full resync interval; at most a third of the lease ttl"
    )
    gc_grace_s: float = Field(
        300.0,
        ge=0,
        le=30 * 86400,
        description="garbage collection removes a store entry nothing references only once it "
        "has been untouched this long",
    )
    gc_interval_s: float = Field(60.0, gt=0, le=86400, description="how often garbage is collected")

    # Builds
    build_workers: int = Field(1, ge=1, le=16, description="builds that run at once")
    build_timeout_s: float = Field(1800.0, gt=0)
    build_retries: int = Field(
        3,
        ge=0,
        le=100,
        description="tries after a failure that the same inputs need not reproduce (a crash, a "
        "timeout, out of memory): a build, or a load on one replica",
    )
    build_retry_backoff_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="wait before the first retry; doubled for each next one, at most 5 min",
    )
    warmup: bool = True
    progressive: bool = Field(
        True,
        description="a new version serves on its baseline engine (FP32 on ONNX Runtime) within "
        "seconds while its optimized engine builds, which then swaps in; false: it serves only "
        "once the optimized engine is ready. An upload's progressive field overrides it",
    )

    # Default batching for engines that do not say otherwise at upload
    max_batch_size: int = Field(8, ge=1, le=4096)
    max_queue_delay_ms: float = Field(0.0, ge=0, le=10_000)
    preferred_batch_sizes: Annotated[list[int], NoDecode] = Field(default_factory=list)
    max_queue_size: int = Field(256, ge=1)
    timeout_ms: float = Field(30_000.0, gt=0)
    instances: int = Field(1, ge=1, le=64)
    priority_levels: int = Field(
        2, ge=1, le=16, description="priority levels per engine (1 is the highest), as Triton's"
    )
    default_priority_level: int = Field(
        1, ge=1, le=16, description="the level of requests that give no priority (or 0)"
    )

    # Overload (docs/OPERATIONS.md, "Overload")
    admission: bool = Field(
        True,
        description="refuse at once (503, Retry-After) a request whose predicted completion falls "
        "after its deadline, and shrink queue waits to KILN_QUEUE_TARGET_MS in a standing queue; "
        "false: only a full queue refuses",
    )
    queue_target_ms: float | None = Field(
        None,
        ge=0,
        le=60_000,
        description="wait budget of a standing queue (one that has not drained for "
        "KILN_QUEUE_INTERVAL_MS); unset: one full batch's run time, at least 5 ms; 0: no budget",
    )
    queue_interval_ms: float = Field(100.0, gt=0, le=60_000)
    inference_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="nice value of the instance threads that run engines, so that the event "
        "loop (answers, refusals, health checks) goes first when they share a core; 0: same priority",
    )
    max_request_rows: int = Field(
        65_536,
        ge=1,
        description="rows one request may hold; more than an engine's max_batch_size are run as "
        "engine-sized batches and answered once",
    )

    # ONNX Runtime
    intra_op_threads: int | None = Field(None, ge=1, le=256)
    session_per_instance: bool = False

    # Limits
    max_upload_bytes: int = Field(1024**3, ge=1024)
    max_data_bytes: int = Field(1024**3, ge=1024)
    max_request_bytes: int = Field(64 * 1024**2, ge=1024)
    max_json_depth: int = Field(32, ge=2, le=1000)
    max_tensor_elements: int = Field(16 * 1024**2, ge=1)
    max_engines: int = Field(100, ge=1)
    max_versions_per_engine: int = Field(10, ge=1)
    source_allow_http: bool = Field(
        False,
        description="accept plain http:// URLs (and redirects to them) as an upload's source; "
        "off: https:// and s3:// only",
    )

    # Security and shutdown
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    protect_predict: bool = False
    allow_unauthenticated: bool = False
    drain_timeout_s: float = Field(30.0, ge=0)
    require_ready: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="engine names that must have a ready version before /health/ready answers 200",
    )

    _split_keys = field_validator("api_keys", "require_ready", mode="before")(_split_csv)

    @field_validator("store")
    @classmethod
    def _absolute_store(cls, value: Path) -> Path:
        """Pin a relative store (``make serve``'s ``data/store``) to the directory kiln
        starts in, once: builds hand store paths to tools that change directory."""
        return value.expanduser().absolute()

    @field_validator("preferred_batch_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("catalog_url")
    @classmethod
    def _check_catalog_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("KILN_CATALOG_URL must be a postgresql://user:password@host:port/database URL")
        return value or None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.catalog_url is None and self.catalog_url_file is not None:
            try:
                url = self.catalog_url_file.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"KILN_CATALOG_URL_FILE cannot be read: {exc}") from None
            self.catalog_url = self._check_catalog_url(url)
        if self.catalog_resync_s * 3 > self.catalog_lease_ttl_s:
            raise ValueError(
                f"KILN_CATALOG_RESYNC_S ({self.catalog_resync_s:g}) must be at most a third of "
                f"KILN_CATALOG_LEASE_TTL_S ({self.catalog_lease_ttl_s:g}): a replica must catch up "
                "with the catalog several times within one lease"
            )
        if self.default_priority_level > self.priority_levels:
            raise ValueError("KILN_DEFAULT_PRIORITY_LEVEL must not exceed KILN_PRIORITY_LEVELS")
        if any(size < 1 or size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError("KILN_PREFERRED_BATCH_SIZES must lie between 1 and KILN_MAX_BATCH_SIZE")
        return self

    def queue_policy(self) -> QueuePolicy:
        """The overload settings every batcher follows."""
        return QueuePolicy(
            admission=self.admission,
            queue_target_ms=self.queue_target_ms,
            queue_interval_ms=self.queue_interval_ms,
            max_request_rows=self.max_request_rows,
            inference_nice=self.inference_nice,
        )

    def backend_options(self) -> dict[str, dict[str, object]]:
        """Constructor arguments per backend name, for the server and its build children."""
        return {
            "onnxruntime": {
                "intra_op_threads": self.intra_op_threads,
                "session_per_instance": self.session_per_instance,
            }
        }

    def all_api_keys(self) -> list[str]:
        """Keys from ``KILN_API_KEYS`` plus one per non-empty line of ``KILN_API_KEYS_FILE``."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += [
                line.strip()
                for line in self.api_keys_file.read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
        return keys
