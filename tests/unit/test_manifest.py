"""Manifest round trip and sha256 verification: the server refuses files that changed."""

import json
from pathlib import Path

import pytest

from service.manifest import Manifest, ManifestError, hash_tree, load_manifest, load_verified, verify_files
from tests.helpers import make_variant


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


# ------------------------------------------------------------------ a version folder is closed


def rewrite(root: Path, manifest: Manifest, **update) -> Manifest:
    """The manifest of ``root`` changed as a hand edit (or a hostile store) would change it."""
    changed = manifest.model_copy(update=update)
    (root / "manifest.json").write_text(changed.to_json())
    return changed


def outside_file(tmp_path: Path, data: bytes = b"not yours") -> tuple[Path, dict]:
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path, hash_tree(path.parent)["secret.bin"]


def test_an_absolute_path_in_files_is_refused(tmp_path):
    manifest = make_variant(tmp_path / "v")
    secret, entry = outside_file(tmp_path)
    rewrite(tmp_path / "v", manifest, files={**manifest.files, str(secret): entry})
    with pytest.raises(ManifestError, match=f"{secret}.* not a path inside the version folder"):
        load_verified(tmp_path / "v")


def test_dot_dot_in_files_is_refused(tmp_path):
    manifest = make_variant(tmp_path / "v")
    _, entry = outside_file(tmp_path)
    rewrite(tmp_path / "v", manifest, files={**manifest.files, "../outside/secret.bin": entry})
    with pytest.raises(ManifestError, match=r"\.\./outside/secret\.bin.* not a path inside the version folder"):
        load_verified(tmp_path / "v")


def test_a_tokenizer_dir_outside_the_version_folder_is_refused(tmp_path):
    manifest = make_variant(tmp_path / "v")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "tokenizer.json").write_text("{}")
    rewrite(tmp_path / "v", manifest, tokenizer_dir="../x")
    with pytest.raises(ManifestError, match=r"\.\./x.* not a path inside the version folder"):
        load_verified(tmp_path / "v")


def test_a_model_file_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path):
    make_variant(tmp_path / "v")
    model = tmp_path / "v" / "model.onnx"
    secret, _ = outside_file(tmp_path, model.read_bytes())  # same bytes: the sha256 alone would pass it
    model.unlink()
    model.symlink_to(secret)
    with pytest.raises(ManifestError, match="model.onnx leads out of the version folder"):
        load_verified(tmp_path / "v")


def test_a_manifest_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path):
    make_variant(tmp_path / "v")
    manifest = tmp_path / "v" / "manifest.json"
    elsewhere = tmp_path / "elsewhere.json"
    manifest.rename(elsewhere)
    manifest.symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="manifest.json leads out of the version folder"):
        load_verified(tmp_path / "v")


@pytest.mark.parametrize("extra", ["extra.bin", "tokenizer/added.txt", ".DS_Store", "sub/manifest.json"])
def test_a_file_not_listed_in_the_manifest_is_refused(tmp_path, extra):
    make_variant(tmp_path / "v")
    (tmp_path / "v" / extra).parent.mkdir(exist_ok=True)
    (tmp_path / "v" / extra).write_bytes(b"added after publishing")
    with pytest.raises(ManifestError, match=f"file {extra} is not listed in the manifest"):
        load_verified(tmp_path / "v")


def test_a_tokenizer_file_added_after_publishing_is_refused(tmp_path):
    make_variant(tmp_path / "v")
    # The server reads tokenizer.json and tokenizer_config.json (service/tokenization.py); neither is
    # listed here, so neither was hash-checked.
    for name in ("tokenizer_config.json", "tokenizer.json"):
        (tmp_path / "v" / "tokenizer" / name).write_text('{"pad_token": "hello"}')
        with pytest.raises(ManifestError, match=f"tokenizer/{name} is not listed in the manifest"):
            load_verified(tmp_path / "v")
        (tmp_path / "v" / "tokenizer" / name).unlink()


def test_a_symlink_to_a_folder_is_refused(tmp_path):
    make_variant(tmp_path / "v")
    (tmp_path / "v" / "tok").symlink_to(tmp_path / "v" / "tokenizer")
    with pytest.raises(ManifestError, match="file tok is not listed in the manifest"):
        load_verified(tmp_path / "v")
