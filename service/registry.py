"""The loaded models: store -> (manifest, tokenizer, backend instances, batcher) per name and version.

A variant that fails to load is logged and reported not ready; it never stops the others. Variants
built for an execution provider this machine lacks are skipped with a log line.

Versions come and go while the server runs (service/reloader.py decides which): a new one is prepared
completely off the event loop (``prepare``), then switched in with one dict assignment on the loop
(``install``), so a request sees the old version or the new one, never a half-loaded one. An old one is
withdrawn from lookups first and closed only once every request that resolved it has finished
(``retire``): requests hold a lease on the entry they resolved (``ModelEntry.acquire``).

What a loaded entry does with a request is service/model_entry.py's; this module owns which entries
exist and their batchers, and passes their events (batches, refusals, loads) to its listeners.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from service.backends.base import Backend, ProviderUnavailable, load_backend
from service.backends.rows import row_infer_fn
from service.batching.batcher import Batcher
from service.batching.policy import BatchLimits
from service.errors import ModelNotFound, NotReady
from service.manifest import Manifest, ManifestError, inside, load_verified
from service.model_entry import ModelEntry, Runtime
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer
from service.version_policy import parse_version_policy

log = logging.getLogger("bertserve.registry")

BackendLoader = Callable[[Path, Manifest, ServiceSettings], Backend]


class Registry:
    def __init__(self, settings: ServiceSettings, backend_loader: BackendLoader = load_backend):
        self.settings = settings
        self.policy = parse_version_policy(settings.version_policy)  # a bad policy fails at start-up
        # What lookups see: ready versions, and failed or skipped ones (503, and why, in the index).
        # Changed on the event loop only, so a lookup never sees it half-updated.
        self.entries: dict[tuple[str, int], ModelEntry] = {}
        # Versions on their way in (loading) or out (unloading): shown in the index and the metrics,
        # never served to a new request.
        self.transitions: set[ModelEntry] = set()
        self.load_failures: Counter[str] = Counter()  # by model name, since start-up
        self._listeners: list[Callable[[str, dict], None]] = []
        self._backend_loader = backend_loader
        self.problem: str | None = None  # why nothing is ready, when nothing is
        self.runtime = Runtime(settings, emit=self._event)  # what every entry shares

    # ------------------------------------------------------------ loading

    def prepare(self, entry: ModelEntry) -> ModelEntry:
        """Verify, load and warm up ``entry``'s files, and build its batcher (not started). Blocking: run
        it in a thread. Touches nothing shared, so serving goes on meanwhile; ``install`` switches it in.
        Leaves the status "loading" when it worked, "failed" or "skipped" with a reason when not."""
        name, version, path = entry.name, entry.version, entry.path
        try:
            entry.manifest = load_verified(path)
            if entry.manifest.name != name or entry.manifest.version != version:
                raise ManifestError(f"{path}: manifest says {entry.manifest.name} v{entry.manifest.version}")
            entry.tokenizer = TextTokenizer(inside(path, entry.manifest.tokenizer_dir), entry.manifest.max_seq_len)
            entry.backends = [self._backend_loader(path, entry.manifest, self.settings)
                              for _ in range(self.settings.instances)]
            entry.solo_backends = self._solo_backends(entry)
            for backend in entry.backends + entry.solo_backends:
                backend.warmup()
            entry.batcher = self._batcher_for(entry)
        except ProviderUnavailable as exc:
            entry.status, entry.reason = "skipped", self._relative(str(exc), entry)
            log.warning("skipping %s v%d: %s", name, version, exc)
        except ManifestError as exc:
            entry.status, entry.reason = "failed", self._relative(str(exc), entry)
            log.error("not loading %s v%d: %s", name, version, exc)
        except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the others
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            entry.status, entry.reason = "failed", self._relative(f"{type(exc).__name__}: {first_line}", entry)
            log.exception("failed to load %s v%d", name, version)
        if entry.status != "loading":
            self.close_backends(entry)
        return entry

    def _relative(self, reason: str, entry: ModelEntry) -> str:
        # Reasons reach the admin's index; the store's absolute path is the server's business.
        return reason.replace(str(entry.path), f"{entry.name}/{entry.version}")

    def install(self, entry: ModelEntry) -> ModelEntry | None:
        """Event loop: make a prepared entry the one lookups find for its version, starting its batcher.

        From this call on, a request for the model's latest version gets it: one dict assignment, so
        no request sees a version that is not warmed up. A failure is counted, and never replaces a
        ready entry. Returns the ready entry it replaced, if any, for the caller to retire.
        """
        key = (entry.name, entry.version)
        self.transitions.discard(entry)
        previous = self.entries.get(key)
        if entry.status == "loading":
            entry.batcher.start()
            entry.status = "ready"
            log.info("ready: %s v%d (%s %s on %s)", entry.name, entry.version, entry.manifest.format,
                     entry.manifest.precision, entry.backends[0].info.provider)
        elif entry.status == "failed":
            self.load_failures[entry.name] += 1
        if entry.ready or previous is None or not previous.ready:
            self.entries[key] = entry
        self._event("loaded", {"model": entry.name, "version": entry.version, "status": entry.status})
        return previous if previous is not None and previous.ready and previous is not entry else None

    def begin_load(self, name: str, version: int) -> ModelEntry:
        """Event loop: a fresh entry for ``prepare``, shown as loading until ``install``."""
        entry = ModelEntry(name=name, version=version, path=self.settings.model_store / name / str(version),
                           runtime=self.runtime)
        self.transitions.add(entry)
        return entry

    def _solo_backends(self, entry: ModelEntry) -> list[Backend]:
        """One wider ONNX CPU session per instance for batches that run alone, when that adds threads.

        Not for TorchScript (torch's thread count is global to the process) nor GPUs. Its threads spin
        only while its run lasts (``session_options``), like every session's.
        """
        s = self.settings
        first = entry.backends[0].info
        if first.format != "onnx" or first.provider != "CPUExecutionProvider" or s.solo_threads <= s.threads:
            return []
        wide = s.model_copy(update={"intra_op_threads": s.solo_threads})
        return [self._backend_loader(entry.path, entry.manifest, wide) for _ in entry.backends]

    def add(self, entry: ModelEntry) -> ModelEntry:
        """Put an entry whose backends are already loaded in place as ready (tests and embedders build
        them by hand): it gets this registry's runtime and a batcher, started with the app."""
        entry.runtime = self.runtime
        if entry.batcher is None:
            entry.batcher = self._batcher_for(entry)
        entry.status = "ready"
        self.entries[(entry.name, entry.version)] = entry
        return entry

    def _batcher_for(self, entry: ModelEntry) -> Batcher:
        s = self.settings
        limits = BatchLimits(max_batch_size=s.max_batch_size,
                             max_batch_tokens=max(s.max_batch_tokens, entry.manifest.max_seq_len),
                             max_queue_delay_s=s.max_queue_delay_ms / 1000,
                             max_padding_ratio=s.padding_ratio)
        names, pad_id = entry.input_names, entry.tokenizer.pad_id
        return Batcher(f"{entry.name}:{entry.version}", [row_infer_fn(b, names, pad_id) for b in entry.backends],
                       limits, s.max_queue_items, on_event=self._model_event(entry.name),
                       solo_infer_fns=[row_infer_fn(b, names, pad_id) for b in entry.solo_backends] or None,
                       max_queue_wait_s=s.max_queue_wait_ms / 1000, stall_after_s=s.stall_timeout_s or None)

    def _model_event(self, model: str):
        def forward(kind: str, data: dict) -> None:
            self._event(kind, {**data, "model": model})

        return forward

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        """Call ``listener(kind, data)`` for every batcher event (data has "model"), from any thread; for
        every request tokenized ("tokenized" {model, seconds, tokens}); and for every version loaded or
        unloaded ("loaded" {model, version, status}, "unloaded" {model, version}), from the event loop."""
        self._listeners.append(listener)

    def _event(self, kind: str, data: dict) -> None:
        for listener in self._listeners:
            try:
                listener(kind, data)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("event listener failed")

    def start(self) -> None:
        """Start the batchers of entries put in place before the event loop ran (tests inject those)."""
        for entry in self.entries.values():
            if entry.batcher is not None and not entry.batcher.started:
                entry.batcher.start()

    # ------------------------------------------------------------ unloading

    def withdraw(self, entry: ModelEntry) -> None:
        """Event loop: no new request resolves ``entry`` from now on; those that did still run."""
        key = (entry.name, entry.version)
        if self.entries.get(key) is entry:
            del self.entries[key]
        if entry.ready:
            entry.status = "unloading"
            self.transitions.add(entry)

    async def drain(self, entry: ModelEntry, grace_s: float) -> None:
        """After ``withdraw``: wait for every request holding the entry, then stop its batcher and
        close its backends. Past ``grace_s`` what is still queued fails as at shutdown (503)."""
        if entry.status != "unloading":
            return  # a failed or skipped entry has nothing running
        deadline = time.monotonic() + grace_s
        log.info("unloading %s v%d: %d request(s) in flight", entry.name, entry.version, entry.leases)
        # Waiting on the leases, not only on the queue: a request may have resolved the entry and
        # still be tokenizing; it must find the batcher open when it gets there.
        while entry.leases > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if entry.leases > 0:
            log.warning("unloading %s v%d: %d request(s) still running after %.0f s", entry.name,
                        entry.version, entry.leases, grace_s)
        if entry.batcher is not None:
            await entry.batcher.stop(max(0.0, deadline - time.monotonic()))
        await asyncio.to_thread(self.close_backends, entry)
        entry.status = "unloaded"
        self.transitions.discard(entry)
        log.info("unloaded: %s v%d", entry.name, entry.version)
        self._event("unloaded", {"model": entry.name, "version": entry.version})

    async def retire(self, entries: list[ModelEntry], grace_s: float) -> None:
        """Withdraw every one of ``entries`` at once, then drain them together."""
        for entry in entries:
            self.withdraw(entry)
        await asyncio.gather(*(self.drain(e, grace_s) for e in entries))

    @staticmethod
    def close_backends(entry: ModelEntry) -> None:
        for backend in entry.backends + entry.solo_backends:
            try:
                backend.close()
            except Exception:  # noqa: BLE001 - a backend that fails to close must not stop the others
                log.exception("closing a backend of %s v%d failed", entry.name, entry.version)

    async def stop(self, grace_s: float) -> None:
        for entry in [*self.entries.values(), *self.transitions]:
            if entry.batcher is not None:
                await entry.batcher.stop(grace_s)
            self.close_backends(entry)
        self.runtime.close()

    # ------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.entries})

    def versions(self, name: str) -> list[ModelEntry]:
        """Every entry lookups can find for ``name`` (ready, failed or skipped), oldest first."""
        return sorted((e for (n, _), e in self.entries.items() if n == name), key=lambda e: e.version)

    def get(self, name: str | None = None, version: int | None = None) -> ModelEntry:
        name = name or self.settings.default_model
        candidates = self.versions(name)
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

    def check_ready(self, entry: ModelEntry | None = None) -> None:
        """What readiness probes ask: raise NotReady unless ``entry`` (or, without one, the server: some
        version serves and none is stalled) can take traffic. The messages name models and states only;
        why a store or a version failed (paths, exception text) stays in the log and the admin's index."""
        if entry is None:
            if not self.ready:
                raise NotReady("no model is ready to serve")
            stalled = sorted({e.name for e in self.entries.values() if e.ready and e.stalled})
            if stalled:
                raise NotReady(f"model {stalled[0]!r} has a batch stuck in its backend")
            return
        if entry.stalled:
            raise NotReady(f"model {entry.name!r} v{entry.version} has a batch stuck in its backend")
