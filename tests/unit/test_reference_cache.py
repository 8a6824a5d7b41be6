"""The reference's evaluation outputs are reused only when nothing they depend on changed."""

from types import SimpleNamespace

import numpy as np

from build_models.recipe import EvaluationConfig
from build_models.reference_cache import CachedReference, ReferenceCache, reference_key

NAMES = ["input_ids", "attention_mask"]


def source(tmp_path, weights: bytes = b"weights", pooling: str = "mean"):
    root = tmp_path / "checkpoint"
    (root / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "model.safetensors").write_bytes(weights)
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return SimpleNamespace(path=root, pooling=pooling, normalize=True, labels=None)


def test_key_follows_what_the_outputs_depend_on(tmp_path):
    cfg = EvaluationConfig()
    base = reference_key(source(tmp_path), "embedding", NAMES, cfg)
    assert reference_key(source(tmp_path), "embedding", NAMES, cfg) == base
    # Timing-only settings do not change the reference's outputs.
    assert reference_key(source(tmp_path), "embedding", NAMES, EvaluationConfig(threads=1, latency_repeats=9)) == base
    changed = [
        reference_key(source(tmp_path, weights=b"other weights"), "embedding", NAMES, cfg),
        reference_key(source(tmp_path, pooling="cls"), "embedding", NAMES, cfg),
        reference_key(source(tmp_path), "classification", NAMES, cfg),
        reference_key(source(tmp_path), "embedding", NAMES + ["token_type_ids"], cfg),
        reference_key(source(tmp_path), "embedding", NAMES, EvaluationConfig(probe_test_samples=401)),
        reference_key(source(tmp_path), "embedding", NAMES, EvaluationConfig(eval_max_seq_len=64)),
        reference_key(source(tmp_path), "embedding", NAMES, EvaluationConfig(dataset="20newsgroups")),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_a_file_in_a_subfolder_of_the_source_is_part_of_the_key(tmp_path):
    src = source(tmp_path)
    before = reference_key(src, "embedding", NAMES, EvaluationConfig())
    (src.path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert reference_key(src, "embedding", NAMES, EvaluationConfig()) != before


def test_entries_round_trip_and_a_damaged_one_reads_as_missing(tmp_path):
    cache = ReferenceCache.in_store(tmp_path / "store", "k" * 64)
    assert cache.load() is None
    outputs = {"test": np.arange(12, dtype=np.float32).reshape(3, 4), "train": np.ones((2, 4), np.float32)}
    quality = {"metric": "reuters-r8_logreg_accuracy", "value": 0.9425, "reference_value": None,
               "retention": None, "extra": {}}
    cache.save(CachedReference(outputs=outputs, quality=quality))
    assert cache.path.parent == tmp_path / "store" / ".cache" / "reference"
    entry = cache.load()
    assert entry.quality == quality
    assert set(entry.outputs) == {"test", "train"}
    np.testing.assert_array_equal(entry.outputs["test"], outputs["test"])
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name], "no temporary file left"
    cache.path.write_bytes(b"not an npz")
    assert cache.load() is None


def test_old_entries_are_trimmed(tmp_path):
    outputs = {"test": np.zeros((1, 2), np.float32)}
    for i in range(12):
        ReferenceCache.in_store(tmp_path, f"{i:064d}").save(CachedReference(outputs=outputs, quality={}))
    assert len(list((tmp_path / ".cache" / "reference").glob("*.npz"))) <= 8
