"""Manifest round trip and sha256 verification: the server refuses files that changed."""

import json
from pathlib import Path

import pytest

from service.manifest import Manifest, ManifestError, hash_tree, load_manifest, load_verified, verify_files


def make_variant(root: Path) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"\x08\x07onnx-bytes" * 100)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    manifest = Manifest(
        name="tiny", version=3, task="embedding", format="onnx", precision="int8",
        providers=["CPUExecutionProvider"], model_file="model.onnx",
        inputs=[{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        outputs=[{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 8]}],
        max_seq_len=128, embedding_dim=8, pooling="mean", normalize=True,
        files=hash_tree(root),
        lineage={"source": {"path": "/x"}, "steps": [{"name": "quantize", "params": {"per_channel": True}}]},
        quality={"dataset": "reuters-r8", "metric": "acc", "value": 0.9, "reference_value": 0.91,
                 "retention": 0.989, "extra": {"mean_cosine": 0.995}},
        fused_nodes={"Attention": 2, "SkipLayerNormalization": 4},
        created_at="2026-11-25T00:00:00+00:00",
    )
    (root / "manifest.json").write_text(manifest.to_json())
    return manifest


def test_round_trip(tmp_path):
    written = make_variant(tmp_path / "v")
    loaded = load_verified(tmp_path / "v")
    assert loaded == written
    assert set(loaded.files) == {"model.onnx", "tokenizer/vocab.txt"}
    assert loaded.lineage.steps[0].params == {"per_channel": True}
    assert loaded.fused_nodes["Attention"] == 2


def test_altered_byte_is_refused(tmp_path):
    manifest = make_variant(tmp_path / "v")
    path = tmp_path / "v" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.onnx does not match its sha256"):
        verify_files(tmp_path / "v", manifest)


def test_truncated_and_missing_files_are_refused(tmp_path):
    manifest = make_variant(tmp_path / "v")
    path = tmp_path / "v" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ManifestError, match="model.onnx has"):
        verify_files(tmp_path / "v", manifest)
    (tmp_path / "v" / "tokenizer" / "vocab.txt").unlink()
    path.write_bytes(b"")
    with pytest.raises(ManifestError):
        verify_files(tmp_path / "v", manifest)


def test_missing_tokenizer_file_is_named(tmp_path):
    manifest = make_variant(tmp_path / "v")
    (tmp_path / "v" / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(ManifestError, match="tokenizer/vocab.txt listed in the manifest is missing"):
        verify_files(tmp_path / "v", manifest)


def test_broken_manifest_is_refused_with_the_field(tmp_path):
    make_variant(tmp_path / "v")
    path = tmp_path / "v" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["precision"] = "int3"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="field precision"):
        load_manifest(tmp_path / "v")
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        load_manifest(tmp_path / "v")
    path.unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path / "v")


def test_model_file_must_be_listed(tmp_path):
    manifest = make_variant(tmp_path / "v")
    manifest.files.pop("model.onnx")
    with pytest.raises(ManifestError, match="not listed"):
        verify_files(tmp_path / "v", manifest)
