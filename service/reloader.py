"""Keeping the served versions in line with the model store: at start-up, on a timer (store polling),
and when the admin asks (the model repository routes, service/api/repository.py).

For each model the version policy picks among the versions on disk that load. Those not serving yet
are loaded in a thread, newest first, and switched in (``Registry.install``) before any version the
policy no longer keeps is drained and closed (``Registry.retire``): a new version takes traffic only
once it is warmed up, and one that fails verification or loading never costs the model the version
that serves (the policy then picks again among the rest). Changes run one at a time, under a lock.

Published versions are immutable (build_models/publish.py renames a complete, hashed folder into
place and never overwrites one), so a version that serves is never reloaded; a failed one is tried
again when its files change, or when the admin asks.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.errors import ModelLoadFailed, ModelNotFound
from service.manifest import MANIFEST_FILE, store_versions
from service.registry import Registry
from service.settings import ServiceSettings

log = logging.getLogger("bertserve.reloader")

# A version folder's files as (relative path, size, mtime): what tells a changed folder from the same.
Fingerprint = tuple[tuple[str, int, int], ...]
Scan = dict[str, dict[int, Fingerprint]]  # name -> version -> fingerprint

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"  # Triton's states


def _fingerprint(path: Path) -> Fingerprint:
    files = []
    for file in sorted(path.rglob("*")):
        if file.is_file():
            stat = file.stat()
            files.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(files)


def scan_store(store: Path, skipped: dict[str, str] | None = None) -> Scan:
    """Every published version in ``store``. Hidden folders (.staging, .checkpoints) are skipped, and
    so is a version folder without its manifest: one being copied in by hand, not yet complete. So is
    whatever else is there (see service/manifest.py ``store_versions``) and a version folder that
    cannot be read: those go into ``skipped`` as relative path -> why. Raises OSError only when the
    store itself cannot be listed."""

    def skip(path: Path, why: str) -> None:
        if skipped is not None:
            skipped[path.relative_to(store).as_posix()] = why

    found: Scan = {}
    for name, versions in store_versions(store, skip).items():
        for version in versions:
            path = store / name / str(version)
            try:
                # Listing, not a stat of the manifest: a folder that cannot be listed cannot be loaded.
                if any(p.name == MANIFEST_FILE for p in path.iterdir()):
                    found.setdefault(name, {})[version] = _fingerprint(path)
            except FileNotFoundError:  # removed while we looked: it is gone
                continue
            except OSError as exc:
                skip(path, f"cannot be read ({exc.strerror or exc})")
    return found


class Reloader:
    def __init__(self, registry: Registry, settings: ServiceSettings):
        self.registry = registry
        self.store = settings.model_store
        self.policy_text = settings.version_policy
        self.grace_s = settings.shutdown_grace_s
        self.poll_interval_s = settings.store_poll_interval_s
        self._lock = asyncio.Lock()
        # One load at a time, off the event loop: loading competes with serving for the cores, and a
        # second thread would only make both loads slower.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        self._unloaded: set[str] = set()  # unloaded by the admin: polling leaves them out until loaded
        self._refused: dict[tuple[str, int], Fingerprint] = {}  # failed versions and the files they had
        self._last_scan: dict[tuple[str, int], Fingerprint] = {}
        self._store_problem: str | None = None
        self._skipped: set[str] = set()  # store entries the last scan skipped: each is logged once

    # ------------------------------------------------------------ entry points

    async def load_store(self) -> None:
        """Start-up: load what the policy picks from every model in the store."""
        await self.reconcile(settle=False)

    async def poll(self) -> None:
        """Rescan the store every ``poll_interval_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.reconcile(settle=True)
            except Exception:  # noqa: BLE001 - one bad scan must not end polling
                log.exception("polling the model store failed; trying again in %.1f s", self.poll_interval_s)

    async def reconcile(self, settle: bool) -> None:
        """Bring every model (but those the admin unloaded) in line with the store.

        ``settle`` (polling): a version folder that is new or changed since the last scan waits for the
        next one, so that one copied in by hand is loaded once complete, and a version that failed is
        tried again only when its files changed.
        """
        async with self._lock:
            scan = await self._scan()
            if scan is None:
                return
            flat = {(n, v): fp for n, versions in scan.items() for v, fp in versions.items()}
            fresh = {key for key, fp in flat.items() if self._last_scan.get(key) != fp} if settle else set()
            self._last_scan = flat
            for name in sorted((set(scan) | set(self.registry.names())) - self._unloaded):
                await self._reconcile_model(name, scan.get(name, {}), {v for n, v in fresh if n == name},
                                            retry=not settle)
            self._update_problem()

    async def load(self, name: str) -> None:
        """Load or reload ``name`` from the store now, trying failed versions again. Raises ModelNotFound
        when the store has no such model, ModelLoadFailed when a version the policy picks failed (the
        versions that served before still serve)."""
        async with self._lock:
            scan = await self._scan() or {}
            if name not in scan:
                raise ModelNotFound(f"model {name!r} is not in the model store; models there: "
                                    f"{', '.join(sorted(scan)) or 'none'}")
            self._unloaded.discard(name)
            await self._reconcile_model(name, scan[name], set(), retry=True)
            self._update_problem()
            intended = set(self.registry.policy(name, sorted(scan[name])))
            failed = [e for e in self.registry.versions(name) if not e.ready and e.version in intended]
            if failed:
                serving = [f"v{e.version}" for e in self.registry.versions(name) if e.ready]
                raise ModelLoadFailed(
                    "; ".join(f"model {name!r} v{e.version} did not load: {e.reason}" for e in failed)
                    + (f"; still serving {', '.join(serving)}" if serving else f"; {name!r} does not serve"))

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``: new requests get 404 at once, those already running
        finish, then the backends close. Polling leaves the model out until it is loaded again."""
        async with self._lock:
            entries = self.registry.versions(name)
            if not entries and name not in (await self._scan() or {}):
                raise ModelNotFound(f"model {name!r} is neither served nor in the model store")
            self._unloaded.add(name)
            await self.registry.retire(entries, self.grace_s)
            self._update_problem()

    async def index(self, ready_only: bool = False) -> list[dict]:
        """Every version in the store or in the server, with Triton's state and the reason for it."""
        rows: dict[tuple[str, int], tuple[str, str]] = {}
        for name, versions in (await self._scan() or {}).items():
            intended = set(self.registry.policy(name, sorted(versions)))
            for version in versions:
                if name in self._unloaded:
                    reason = "unloaded"
                elif version in intended:
                    reason = "not loaded yet"
                else:
                    reason = f"not selected by the version policy {self.policy_text!r}"
                rows[(name, version)] = (UNAVAILABLE, reason)
        for (name, version), entry in list(self.registry.entries.items()):
            rows[(name, version)] = (READY, "") if entry.ready else (UNAVAILABLE, entry.reason or entry.status)
        for entry in list(self.registry.transitions):
            rows[(entry.name, entry.version)] = (LOADING, "") if entry.status == "loading" else (UNLOADING, "")
        return [{"name": name, "version": str(version), "state": state, "reason": reason}
                for (name, version), (state, reason) in sorted(rows.items())
                if not ready_only or state == READY]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ one model

    async def _reconcile_model(self, name: str, disk: dict[int, Fingerprint], fresh: set[int],
                               retry: bool) -> None:
        refused = set() if retry else {v for v, fp in disk.items() if self._refused.get((name, v)) == fp}
        while True:
            serving = {e.version for e in self.registry.versions(name) if e.ready}
            candidates = sorted(v for v in disk if v not in refused and (v in serving or v not in fresh))
            wanted = set(self.registry.policy(name, candidates))
            missing = sorted(wanted - serving, reverse=True)
            if not missing:
                break
            for version in missing:
                if not await self._load(name, version, disk[version]):
                    refused.add(version)  # and pick again among the rest: an older one may serve
        stale = [e for e in self.registry.versions(name) if e.ready and e.version not in wanted]
        if stale:
            log.info("%s: retiring %s (serving %s)", name, ", ".join(f"v{e.version}" for e in stale),
                     ", ".join(f"v{v}" for v in sorted(wanted)) or "nothing")
            await self.registry.retire(stale, self.grace_s)
        # A failure stays listed (503 for its version, its reason in the index) while the policy still
        # asks for that version; once a newer version or an unpublish replaces it, it goes.
        intended = set(self.registry.policy(name, sorted(disk)))
        for entry in self.registry.versions(name):
            if not entry.ready and entry.version not in intended:
                self.registry.withdraw(entry)
        for key in [k for k in self._refused if k[0] == name and k[1] not in disk]:
            del self._refused[key]

    async def _load(self, name: str, version: int, fingerprint: Fingerprint) -> bool:
        entry = self.registry.begin_load(name, version)
        log.info("loading %s v%d", name, version)
        work = asyncio.get_running_loop().run_in_executor(self._pool, self.registry.prepare, entry)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:  # shutting down: close what the thread loads once it is done
            self.registry.transitions.discard(entry)
            work.add_done_callback(lambda _: self.registry.close_backends(entry))
            raise
        replaced = self.registry.install(entry)
        if replaced is not None:
            await self.registry.retire([replaced], self.grace_s)
        if entry.ready:
            self._refused.pop((name, version), None)
            return True
        self._refused[(name, version)] = fingerprint
        return False

    # ------------------------------------------------------------ the store

    async def _scan(self) -> Scan | None:
        """The store's versions, or None when it is missing, unreadable or empty: then nothing changes,
        since an unmounted volume looks empty and must not unload every model."""
        store = self.store
        skipped: dict[str, str] = {}
        try:
            scan = await asyncio.to_thread(scan_store, store, skipped) if store.is_dir() else None
            problem = None if scan is not None else f"model store {store} does not exist; run `make build`"
        except OSError as exc:
            scan, problem = None, f"model store {store} cannot be read ({exc.strerror or exc})"
        if scan is not None:
            # Once per stray, not at every poll; one that goes and comes back is news again.
            for path in sorted(skipped.keys() - self._skipped):
                log.warning("model store: skipping %r: %s", path, skipped[path])
            self._skipped = set(skipped)
            if not scan:
                problem = f"model store {store} holds no variants; run `make build`"
        if problem != self._store_problem and problem is not None:
            log.error("%s%s", problem, "; serving what is loaded" if self.registry.ready else "")
        self._store_problem = problem
        if problem is not None:
            if not self.registry.ready:
                self.registry.problem = problem
            return None
        return scan

    def _update_problem(self) -> None:
        if self.registry.ready:
            self.registry.problem = None
        elif self.registry.entries:
            self.registry.problem = "no variant in the store could be loaded; see the log"

