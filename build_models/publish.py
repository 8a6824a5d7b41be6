"""Publishing into the model store: stage in a hidden folder, hash every file, rename into place.

Layout: ``<store>/<name>/<version>/{manifest.json, model.onnx|model.pt, tokenizer/}``. A version is
an integer one above the highest present; an existing version is never overwritten. Staging lives
in ``<store>/.staging`` (same filesystem, so the final rename is atomic) and is removed on failure,
so an interrupted build leaves nothing half-written where the server looks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from build_models.errors import StoreError
from service.manifest import MANIFEST_FILE, Manifest, hash_tree, store_versions, version_numbers

STAGING = ".staging"


def ensure_writable(store: Path) -> None:
    try:
        store.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise StoreError(f"model store {store} is not writable ({exc.strerror or exc})") from None


def new_staging_dir(store: Path, name: str) -> Path:
    path = store / STAGING / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    parent = staging.parent
    if parent.name == STAGING:
        try:
            parent.rmdir()  # only when empty: another build may be staging beside us
        except OSError:
            pass


def existing_versions(store: Path, name: str) -> list[int]:
    return version_numbers(store / name)


def publish(store: Path, staging: Path, manifest_fields: dict) -> Manifest:
    """Write the manifest (with a fresh version and every file's sha256) and move the variant in."""
    name = manifest_fields["name"]
    files = hash_tree(staging)
    (store / name).mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        version = (existing_versions(store, name) or [0])[-1] + 1
        manifest = Manifest.model_validate({**manifest_fields, "version": version, "files": files})
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        target = store / name / str(version)
        if target.exists():
            continue  # a concurrent build took this number
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():
                continue
            raise
        discard(staging)  # tidies the empty .staging parent
        return manifest
    raise StoreError(f"could not find a free version number for {name} in {store}")


def iter_variants(store: Path):
    """(name, version, dir) of every published variant, skipping staging and stray folders."""
    for name, versions in store_versions(store).items():
        for version in versions:
            yield name, version, store / name / str(version)
