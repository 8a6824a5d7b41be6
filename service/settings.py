"""Run-time settings: one object, read from BERTSERVE_* environment variables once, passed everywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.long_input import Policy


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTSERVE_", extra="ignore", protected_namespaces=())

    # Where and what to serve
    model_store: Path = Path("model_store")
    default_model: str = "minilm"
    # "latest", "latest:N" (the N newest versions of each name), "all", "specific:1,3" or
    # "specific:NAME=1,2;OTHER=3"; applied to the versions that load (a broken newest one leaves the
    # one before it serving).
    version_policy: str = "latest"
    # Seconds between rescans of the store for published and removed versions (service/reloader.py);
    # 0 = off. Off by default, as Triton's default model control mode: an image that bakes its store in
    # has nothing to watch, and a version deleted from disk is then unloaded only when someone asks.
    store_poll_interval_s: float = Field(0.0, ge=0, le=86400)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # The KServe v2 gRPC service (service/api/grpc_service.py) on this port, on the same host, beside
    # HTTP: same models and batchers. Off when unset; needs the grpc extra (grpcio, tritonclient[grpc]).
    grpc_port: int | None = Field(None, ge=1, le=65535)
    device: Literal["cpu", "cuda"] = "cpu"

    # Backends
    # 0 = automatic: two single-threaded instances on a multi-core machine. Under concurrent load two
    # independent sessions keep the cores busier than one multi-threaded session (measured in bench/:
    # docs/measurements.md); a lone request still gets every core through the solo sessions
    # (solo_batch_threads below).
    intra_op_threads: int = Field(0, ge=0)  # threads per instance; 0 = cores / instances
    instances_per_model: int = Field(0, ge=0, le=16)  # backend instances (worker threads) per model
    # ONNX Runtime's intra-op threads spin between the parallel sections of a run instead of sleeping
    # and being woken for each of them, and stop spinning as soon as the run ends, so that they never
    # burn a core the event loop needs between batches (docs/measurements.md).
    ort_spinning: bool = True
    # Intra-op threads of an extra ONNX Runtime session per CPU instance, used for a batch that runs
    # alone (other workers idle, queue empty): a lone text then gets every core instead of one. 0 = auto
    # (all cores, when there are several single-threaded instances); 1 = off (no extra sessions).
    solo_batch_threads: int = Field(0, ge=0, le=256)

    # Dynamic batching
    max_batch_size: int = Field(32, ge=1, le=4096)
    # Padded tokens per batch (batch size x longest item). Small on purpose: with single-threaded CPU
    # instances, 2048 served 16-text mixed requests faster than 8192 did (bench/: docs/measurements.md),
    # and short texts still fill batches of 32. The model's max_seq_len always fits.
    max_batch_tokens: int = Field(2048, ge=16)
    # 0: a lone item goes at once; under load batches still form while the workers are busy. A few ms
    # helps on a GPU, where a bigger batch costs little more than a small one.
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000)
    # Padded / real tokens a batch may reach before companions of a different length wait for the next
    # batch (length bucketing inside the queue). 0 = no limit; unset = by device: 1.0 on CPU, where a
    # batch's own fixed cost is about that of one token (bench/: docs/measurements.md), so padding is
    # pure loss and only texts of the same length go together; no limit on CUDA, where a bigger batch
    # costs little more than a small one.
    max_padding_ratio: float | None = Field(None, ge=0)
    max_queue_items: int = Field(4096, ge=1)  # beyond this, 429 with Retry-After
    # Also 429 while the queued work alone would take longer than this to reach (estimated from the
    # queued tokens and recent batch times): under overload a client hears at once, not after
    # request_timeout_s. It is also what the queue is sized for: clients that wait for each answer
    # before sending again are never refused while their requests together are less work than this.
    # A third of the request timeout, so accepted work keeps most of its time. 0 = off.
    max_queue_wait_ms: float = Field(10_000.0, ge=0)

    # The watchdog (service/watchdog.py): a batch inside a backend for longer than this marks its model
    # not ready (readiness probes 503) until it ends. 0 = automatic: 20 times what recent batches say
    # this batch should take, and at least 5 s.
    stall_timeout_s: float = Field(0.0, ge=0, le=86400)

    # Requests
    request_timeout_s: float = Field(30.0, gt=0)  # deadline for an item to reach inference
    # On SIGTERM: stop accepting, then let in-flight requests finish for up to this long. An unloaded
    # or replaced model version drains its requests for up to this long too.
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600)
    max_inputs_per_request: int = Field(256, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_chars_per_text: int = Field(100_000, ge=1)
    # Tokens per request, after truncation (413 beyond): bounds one request's tokenizing, inference and
    # answer. 256 texts of 512 tokens fit; /tokenize of megabytes of text does not.
    max_tokens_per_request: int = Field(131_072, ge=1)
    tokenizer_threads: int = Field(2, ge=1, le=64)
    # Inputs longer than a model's max_seq_len (service/long_input.py): error (422), truncate (from the
    # right; a request may cut from the left), or window (split into overlapping windows of max_seq_len
    # tokens whose outputs are averaged, weighted by new tokens). A model's manifest may name its own
    # policy, and a request may ask for another.
    long_input: Policy = "error"
    window_overlap: int = Field(32, ge=0, le=8192)  # tokens each window shares with the one before it
    # Windows per input (413 beyond): with the character and token caps, bounds one long document's work.
    max_windows_per_input: int = Field(16, ge=1, le=4096)

    # Access control (service/auth.py). Comma-separated keys for `Authorization: Bearer KEY` on the
    # inference and metadata routes; empty = open. Secrets: never logged, masked in dumps.
    api_keys: SecretStr = SecretStr("")
    # The key for the model repository routes (load, unload, index); empty = those routes are disabled.
    admin_key: SecretStr = SecretStr("")
    # Health, readiness and /metrics stay open for probes and scrapers even when API keys are set.
    open_health_and_metrics: bool = True

    # CORS for browser apps on other origins (service/cors.py): comma-separated origins, each
    # scheme://host[:port] as browsers send it, or "*" for any; empty = off (no Access-Control-* headers).
    cors_origins: str = ""
    # Access-Control-Allow-Credentials: browsers may send cookies and HTTP auth along. Refused with "*".
    cors_allow_credentials: bool = False

    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"  # json: one object per line, for log shippers
    access_log: bool = True  # one line per request: id, method, route, model, status, duration; never text

    @model_validator(mode="after")
    def _check(self) -> "ServiceSettings":
        if self.max_padding_ratio is not None and 0 < self.max_padding_ratio < 1:
            raise ValueError("max_padding_ratio is padded/real tokens: 0 (no limit) or at least 1")
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(f"grpc_port is {self.grpc_port}, the HTTP port too; gRPC needs a port of its own")
        return self

    @property
    def padding_ratio(self) -> float | None:
        """The batches' padding limit in effect (None = no limit): the setting, or the device's default."""
        if self.max_padding_ratio is None:
            return 1.0 if self.device == "cpu" else None
        return self.max_padding_ratio or None

    @property
    def admin_secret(self) -> str:
        """The admin key, or "" when the model repository routes are disabled."""
        return self.admin_key.get_secret_value().strip()

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    @property
    def instances(self) -> int:
        return self.instances_per_model or min(2, available_cores())

    @property
    def threads(self) -> int:
        return self.intra_op_threads or max(1, available_cores() // self.instances)

    @property
    def solo_threads(self) -> int:
        """Threads of the solo sessions; not above ``threads`` means none are made."""
        return self.solo_batch_threads or available_cores()

    # ------------------------------------------------------------ CORS

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @model_validator(mode="after")
    def _check_cors(self) -> "ServiceSettings":
        origins = self.cors_origin_list
        for origin in origins:
            # An origin is what a browser sends in Origin: a path or a trailing slash would never match.
            if origin != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+", origin):
                raise ValueError(f"BERTSERVE_CORS_ORIGINS: {origin[:100]!r} is not an origin; write each as "
                                 f"scheme://host[:port] with no path (https://app.example.com), or '*'")
        if "*" in origins and self.cors_allow_credentials:
            raise ValueError("BERTSERVE_CORS_ORIGINS='*' with BERTSERVE_CORS_ALLOW_CREDENTIALS=true is refused, as "
                             "browsers refuse it: name the origins that may send credentials")
        return self


def available_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's CPU
    limit), which os.cpu_count() does not see: on a 64-core node a pod limited to 2 CPUs must not start
    64 threads per session."""
    import math
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
