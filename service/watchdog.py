"""The watchdog: notices a batch stuck inside a backend and has its model report not ready.

A hung backend (a deadlocked driver, a GPU gone away, a pathological input) holds its worker thread for
ever, and nothing on the request path can see that: queued requests still expire on time (the
batcher's deadline timers) and the other instances may still serve. So a task on the event loop asks
each batcher, a few times a second, whether a batch has run far past its expected time
(``Batcher.check_stalls``; the limit is ``stall_timeout_s`` or derived from recent batches). A stalled
model answers 503 on the readiness routes (``Registry.check_ready``), so an orchestrator stops sending
it traffic, and is counted in ``bertserve_stalled_batches_total``; it is ready again the moment the
batch ends.
"""

from __future__ import annotations

import asyncio
import logging

from service.registry import Registry

log = logging.getLogger("bertserve.watchdog")

CHECK_INTERVAL_S = 0.25


async def watch(registry: Registry, interval_s: float = CHECK_INTERVAL_S) -> None:
    """Check every serving batcher each ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        for entry in [*registry.entries.values(), *registry.transitions]:
            if entry.batcher is None or not entry.batcher.started:
                continue
            try:
                entry.batcher.check_stalls()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one model's trouble
                log.exception("watchdog: checking %s v%d failed", entry.name, entry.version)
