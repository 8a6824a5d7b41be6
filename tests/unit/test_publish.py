"""Publishing: versions increase, nothing is overwritten, staging never shows up as a variant."""

from pathlib import Path

import pytest

from build_models.errors import StoreError
from build_models.publish import ensure_writable, existing_versions, iter_variants, new_staging_dir, publish
from service.manifest import load_verified


def fields(name="tiny") -> dict:
    return {
        "name": name, "task": "embedding", "format": "onnx", "precision": "fp32",
        "providers": ["CPUExecutionProvider"], "model_file": "model.onnx",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 4]}],
        "max_seq_len": 64, "lineage": {"source": {"path": "/x"}}, "created_at": "2026-11-25T00:00:00+00:00",
    }


def stage(store: Path, payload: bytes, name="tiny") -> Path:
    staging = new_staging_dir(store, name)
    (staging / "model.onnx").write_bytes(payload)
    return staging


def test_versions_increase_and_are_never_overwritten(tmp_path):
    store = tmp_path / "store"
    ensure_writable(store)
    first = publish(store, stage(store, b"one"), fields())
    second = publish(store, stage(store, b"two"), fields())
    assert (first.version, second.version) == (1, 2)
    assert (store / "tiny/1/model.onnx").read_bytes() == b"one"
    assert (store / "tiny/2/model.onnx").read_bytes() == b"two"
    assert load_verified(store / "tiny/2").files["model.onnx"].size_bytes == 3
    assert not (store / ".staging").exists()


def test_listing_skips_staging_and_stray_folders(tmp_path):
    store = tmp_path / "store"
    publish(store, stage(store, b"x"), fields("a"))
    stage(store, b"half-built", "b")  # an interrupted build's leftovers
    (store / "a" / "notes").mkdir()
    assert [(n, v) for n, v, _ in iter_variants(store)] == [("a", 1)]
    assert existing_versions(store, "b") == []


def test_unwritable_store_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="not writable"):
        ensure_writable(blocker / "store")
