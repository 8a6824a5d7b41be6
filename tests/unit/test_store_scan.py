"""An untidy model store never stops the server: what is not a model's version folder is skipped with one
log line, and start-up, polling and the repository routes go on serving what is there."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest

from build_models.publish import existing_versions, new_staging_dir, publish
from service.backends.fake import FakeBackend
from service.manifest import store_versions, version_numbers
from service.registry import Registry
from service.reloader import Reloader, scan_store
from service.settings import ServiceSettings
from tests.helpers import fake_manifest, tokenizer_dir

# What an untidy store holds beside the one real version, m/1, each as the scan names it.
STRAYS = {
    "lost+found": "a volume root's, mode 000",
    "locked": "a model folder the server may not list",
    "README.md": "a file beside the models",
    "n": "a model folder that is a file",
    "loop": "a symlink to itself",
    "m/notes.txt": "a file beside the versions",
    "m/²": "str.isdigit() says yes, int() says no",
    "m/١": "an Arabic-Indic one, not version 1",
    "m/01": "would alias version 1",
    "m/0": "no manifest has version 0",
    "m/1234567890": "more digits than a KServe route takes",
    "m/v2": "not a number",
    "m/2": "a version folder the server may not list",
}
UNLISTABLE = ("lost+found", "locked", "m/2")


def publish_fake(store: Path, name: str = "m") -> int:
    """A version as build_models/publish.py leaves it, with a tokenizer and a fake model file."""
    staging = new_staging_dir(store, name)
    tokenizer_dir(staging)
    (staging / "model.onnx").write_bytes(f"fake model {name}".encode())
    fields = fake_manifest(name, "embedding", 8, 32).model_dump(exclude={"version", "files"})
    return publish(store, staging, fields).version


def untidy_store(root: Path, monkeypatch) -> Path:
    """m/1 published, m/2 published but unlistable, and every stray of STRAYS; the unlistable folders
    refuse listing as mode 000 would (tests run as root, which ignores modes)."""
    store = root / "store"
    assert publish_fake(store) == 1
    for rel in ("lost+found/#1234", "locked/1", "m/²", "m/١", "m/01", "m/0", "m/1234567890", "m/v2"):
        (store / rel).mkdir(parents=True)
        if rel.startswith("m/"):
            (store / rel / "manifest.json").write_text("{}")
    (store / "README.md").write_text("models live here\n")
    (store / "n").write_text("")
    (store / "loop").symlink_to(store / "loop")
    (store / "m" / "notes.txt").write_text("")
    assert publish_fake(store) == 2
    block_listing(monkeypatch, *(store / rel for rel in UNLISTABLE))
    return store


def block_listing(monkeypatch, *folders: Path) -> None:
    blocked = {os.fspath(f) for f in folders}

    def guard(real):
        def listing(path=".", *args, **kwargs):
            if os.fspath(path) in blocked:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return listing

    monkeypatch.setattr(os, "listdir", guard(os.listdir))
    monkeypatch.setattr(os, "scandir", guard(os.scandir))


def reloader_for(store: Path) -> Reloader:
    settings = ServiceSettings(model_store=store, default_model="m", access_log=False)
    return Reloader(Registry(settings, backend_loader=lambda *_: FakeBackend(dim=8)), settings)


def skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bertserve.reloader" and r.levelno == logging.WARNING]


def test_scan_keeps_only_version_folders(tmp_path, monkeypatch):
    store = untidy_store(tmp_path, monkeypatch)
    skipped: dict[str, str] = {}
    assert {name: sorted(v) for name, v in scan_store(store, skipped).items()} == {"m": [1]}
    assert set(skipped) == set(STRAYS)
    assert "not a model folder" in skipped["lost+found"]  # never even listed
    assert "cannot be read" in skipped["locked"] and "cannot be read" in skipped["m/2"]
    assert "leading zero" in skipped["m/01"]
    assert store_versions(store) == {"m": [1, 2]}  # m/2 is a version; the server cannot read it
    assert version_numbers(store / "m") == [1, 2]


def test_a_non_ascii_digit_is_no_version(tmp_path):
    (tmp_path / "k" / "١").mkdir(parents=True)
    (tmp_path / "k" / "١" / "manifest.json").write_text("{}")
    assert version_numbers(tmp_path / "k") == []
    assert store_versions(tmp_path) == {}


def test_publishing_beside_strays_takes_the_next_version(tmp_path):
    store = tmp_path / "store"
    publish_fake(store)
    for name in ("²", "01", "١", "0009"):
        (store / "m" / name).mkdir()
    (store / "m" / "notes.txt").write_text("")
    assert existing_versions(store, "m") == [1]
    assert publish_fake(store) == 2


def test_start_up_polling_and_the_repository_calls_skip_strays_with_one_log_line_each(tmp_path, monkeypatch,
                                                                                        caplog):
    store = untidy_store(tmp_path, monkeypatch)
    reloader = reloader_for(store)

    async def scenario():
        await reloader.load_store()
        assert [(e.name, e.version, e.status) for e in reloader.registry.versions("m")] == [("m", 1, "ready")]
        for _ in range(2):  # polls: nothing new to say
            await reloader.reconcile(settle=True)
        await reloader.load("m")
        assert await reloader.index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]
        await reloader.unload("m")
        assert [row["reason"] for row in await reloader.index()] == ["unloaded"]

    with caplog.at_level(logging.WARNING, logger="bertserve.reloader"):
        asyncio.run(scenario())
    reloader.close()
    lines = skip_lines(caplog)
    for rel in STRAYS:
        assert sum(f"'{rel}'" in line for line in lines) == 1, (rel, lines)
    assert len(lines) == len(STRAYS), lines


def test_a_stray_that_goes_and_comes_back_is_logged_again(tmp_path, caplog):
    store = tmp_path / "store"
    publish_fake(store)
    (store / "m" / "notes.txt").write_text("")
    reloader = reloader_for(store)

    async def scenario():
        await reloader.load_store()
        (store / "m" / "notes.txt").unlink()
        await reloader.reconcile(settle=True)
        (store / "m" / "notes.txt").write_text("again")
        await reloader.reconcile(settle=True)

    with caplog.at_level(logging.WARNING, logger="bertserve.reloader"):
        asyncio.run(scenario())
    reloader.close()
    assert sum("'m/notes.txt'" in line for line in skip_lines(caplog)) == 2


def test_an_unlistable_store_changes_nothing(tmp_path, monkeypatch, caplog):
    store = tmp_path / "store"
    publish_fake(store)
    reloader = reloader_for(store)

    async def scenario():
        await reloader.load_store()
        block_listing(monkeypatch, store)
        await reloader.reconcile(settle=True)
        assert reloader.registry.get("m").version == 1  # still serving
        assert [row["state"] for row in await reloader.index()] == ["READY"]

    with caplog.at_level(logging.ERROR, logger="bertserve.reloader"):
        asyncio.run(scenario())
    reloader.close()
    assert any("cannot be read" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("blocked", ["store", "m"])
def test_an_unlistable_store_at_start_up_is_reported_not_raised(tmp_path, monkeypatch, blocked):
    store = tmp_path / "store"
    publish_fake(store)
    block_listing(monkeypatch, store if blocked == "store" else store / "m")
    reloader = reloader_for(store)
    asyncio.run(reloader.load_store())
    reloader.close()
    assert not reloader.registry.ready and reloader.registry.problem
