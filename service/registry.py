"""The loaded models: store -> (manifest, tokenizer, backend instances, batcher) per name and version.

A variant that fails to load is logged and reported not ready; it never stops the others. Variants
built for an execution provider this machine lacks are skipped with a log line.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from service.backends.base import Backend, ProviderUnavailable, load_backend
from service.batching.batcher import Batcher
from service.batching.policy import BatchLimits
from service.errors import ModelNotFound, NotReady
from service.manifest import Manifest, ManifestError, load_verified, store_versions
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer, pad_batch

log = logging.getLogger("bertserve.registry")

BackendLoader = Callable[[Path, Manifest, ServiceSettings], Backend]


@dataclass
class ModelEntry:
    name: str
    version: int
    path: Path
    status: str = "loading"  # loading | ready | failed | skipped | unloaded
    reason: str | None = None
    manifest: Manifest | None = None
    tokenizer: TextTokenizer | None = None
    backends: list[Backend] = field(default_factory=list)
    solo_backends: list[Backend] = field(default_factory=list)  # same model, more threads (see settings)
    batcher: Batcher | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.manifest.inputs]


def parse_version_policy(policy: str) -> Callable[[str, list[int]], list[int]]:
    """Triton-style policies: 'latest', 'latest:N', 'all', 'specific:name=1,2;other=3'."""
    policy = policy.strip()
    if policy == "all":
        return lambda _n, versions: versions
    match = re.fullmatch(r"latest(?::(\d+))?", policy)
    if match:
        n = int(match.group(1) or 1)
        return lambda _n, versions: versions[-n:]
    if policy.startswith("specific:"):
        wanted: dict[str, set[int]] = {}
        for part in filter(None, policy[len("specific:"):].split(";")):
            name, _, nums = part.partition("=")
            wanted[name.strip()] = {int(v) for v in nums.split(",") if v.strip()}
        return lambda name, versions: [v for v in versions if v in wanted.get(name, {versions[-1]} if versions else set())]
    raise ValueError(f"unknown version policy {policy!r}; use latest, latest:N, all or specific:NAME=1,2")


class Registry:
    def __init__(self, settings: ServiceSettings, backend_loader: BackendLoader = load_backend):
        self.settings = settings
        self.entries: dict[tuple[str, int], ModelEntry] = {}
        self.load_failures: Counter[str] = Counter()  # by model name, since start-up
        self._listeners: list[Callable[[str, dict], None]] = []
        self._backend_loader = backend_loader
        self.problem: str | None = None  # why nothing is ready, when nothing is

    # ------------------------------------------------------------ loading

    def load_all(self) -> None:
        store = self.settings.model_store
        if not store.is_dir():
            self.problem = f"model store {store} does not exist; run `make build`"
            log.error(self.problem)
            return
        choose = parse_version_policy(self.settings.version_policy)
        found = store_versions(store)
        if not found:
            self.problem = f"model store {store} holds no variants; run `make build`"
            log.error(self.problem)
            return
        for name, versions in found.items():
            for version in choose(name, versions):
                self.load(name, version)
        if not any(e.ready for e in self.entries.values()):
            self.problem = "no variant in the store could be loaded; see the log"

    def load(self, name: str, version: int) -> ModelEntry:
        path = self.settings.model_store / name / str(version)
        entry = ModelEntry(name=name, version=version, path=path)
        self.entries[(name, version)] = entry
        try:
            entry.manifest = load_verified(path)
            if entry.manifest.name != name or entry.manifest.version != version:
                raise ManifestError(f"{path}: manifest says {entry.manifest.name} v{entry.manifest.version}")
            entry.tokenizer = TextTokenizer(path / entry.manifest.tokenizer_dir, entry.manifest.max_seq_len)
            entry.backends = [self._backend_loader(path, entry.manifest, self.settings)
                              for _ in range(self.settings.instances)]
            entry.solo_backends = self._solo_backends(entry)
            for backend in entry.backends + entry.solo_backends:
                backend.warmup()
        except ProviderUnavailable as exc:
            entry.status, entry.reason = "skipped", str(exc)
            log.warning("skipping %s v%d: %s", name, version, exc)
            return entry
        except ManifestError as exc:
            entry.status, entry.reason = "failed", str(exc)
            log.error("not loading %s v%d: %s", name, version, exc)
            self.load_failures[name] += 1
            return entry
        except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the others
            entry.status, entry.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.exception("failed to load %s v%d", name, version)
            self.load_failures[name] += 1
            return entry
        entry.batcher = self._make_batcher(entry)
        entry.status = "ready"
        log.info("ready: %s v%d (%s %s on %s)", name, version, entry.manifest.format, entry.manifest.precision,
                 entry.backends[0].info.provider)
        return entry

    def _solo_backends(self, entry: ModelEntry) -> list[Backend]:
        """One wider ONNX CPU session per instance for batches that run alone, when that adds threads.

        Not for TorchScript (torch's thread count is global to the process) nor GPUs. Spinning is off:
        a solo session's threads must not keep spinning after its batch while another worker starts.
        """
        s = self.settings
        first = entry.backends[0].info
        if first.format != "onnx" or first.provider != "CPUExecutionProvider" or s.solo_threads <= s.threads:
            return []
        wide = s.model_copy(update={"intra_op_threads": s.solo_threads, "ort_spinning": False})
        return [self._backend_loader(entry.path, entry.manifest, wide) for _ in entry.backends]

    def _make_batcher(self, entry: ModelEntry) -> Batcher:
        s = self.settings
        limits = BatchLimits(max_batch_size=s.max_batch_size,
                             max_batch_tokens=max(s.max_batch_tokens, entry.manifest.max_seq_len),
                             max_queue_delay_s=s.max_queue_delay_ms / 1000,
                             max_padding_ratio=s.max_padding_ratio or None)
        names, pad_id = entry.input_names, entry.tokenizer.pad_id

        def infer_fn_for(backend: Backend):
            output = backend.info.output_name

            def infer(items) -> list[np.ndarray]:
                batch = pad_batch([it.payload for it in items], names, pad_id)
                rows = backend.infer(batch)[output]
                return list(rows)

            return infer

        return Batcher(f"{entry.name}:{entry.version}", [infer_fn_for(b) for b in entry.backends], limits,
                       s.max_queue_items, on_event=self._model_event(entry.name),
                       solo_infer_fns=[infer_fn_for(b) for b in entry.solo_backends] or None,
                       max_queue_wait_s=s.max_queue_wait_ms / 1000)

    def _model_event(self, model: str):
        def forward(kind: str, data: dict) -> None:
            self._event(kind, {**data, "model": model})

        return forward

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        """Call ``listener(kind, data)`` for every batcher event (data has "model"); from any thread."""
        self._listeners.append(listener)

    def _event(self, kind: str, data: dict) -> None:
        for listener in self._listeners:
            try:
                listener(kind, data)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("event listener failed")

    def start(self) -> None:
        for entry in self.entries.values():
            if entry.batcher is not None:
                entry.batcher.start()

    async def stop(self, grace_s: float) -> None:
        for entry in self.entries.values():
            if entry.batcher is not None:
                await entry.batcher.stop(grace_s)
            for backend in entry.backends + entry.solo_backends:
                backend.close()

    # ------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.entries})

    def get(self, name: str | None = None, version: int | None = None) -> ModelEntry:
        name = name or self.settings.default_model
        candidates = sorted((e for (n, _), e in self.entries.items() if n == name), key=lambda e: e.version)
        if not candidates:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"model {name!r} is not served here; models: {known}")
        if version is not None:
            entry = next((e for e in candidates if e.version == version), None)
            if entry is None:
                raise ModelNotFound(f"model {name!r} has no loaded version {version}; "
                                    f"versions: {', '.join(str(e.version) for e in candidates)}")
        else:
            ready = [e for e in candidates if e.ready]
            entry = ready[-1] if ready else candidates[-1]
        if not entry.ready:
            # The reason (paths, exception text) goes to the log, not to clients.
            raise NotReady(f"model {name!r} v{entry.version} is not ready ({entry.status})")
        return entry

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.entries.values())
