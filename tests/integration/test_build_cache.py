"""What one build shares with the next and between its variants: the reference's evaluation outputs
(cached in the store) and one latency session for all variants."""

import json

import pytest
import yaml

from build_models.pipeline import build
from tests.helpers import tiny_recipe

VARIANTS = [{"name": "t-fused", "steps": [{"export_onnx": {}}, {"optimize": {}}]},
            {"name": "t-int8", "steps": [{"export_onnx": {}}, {"optimize": {}}, {"quantize": {}}]}]


def run_build(tmp_path, source, store, evaluation=None, only=None):
    recipe = tiny_recipe(source, VARIANTS)
    recipe["evaluation"].update(evaluation or {})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    lines: list[str] = []
    result = build(path, store, only=only, log=lines.append)
    assert all(o.published for o in result.outcomes)
    return result, lines


def manifest(result, name):
    outcome = next(o for o in result.outcomes if o.name == name)
    return json.loads((outcome.path / "manifest.json").read_text())


def from_cache(lines):
    return any(line.startswith("reference ") and "from the cache" in line for line in lines)


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, tiny_embedding_dir):
    """One variant built into a fresh store, then the whole recipe into the same store."""
    tmp = tmp_path_factory.mktemp("cache")
    store = tmp / "store"
    first = run_build(tmp, tiny_embedding_dir, store, only=["t-int8"])
    second = run_build(tmp, tiny_embedding_dir, store)
    return store, first, second


def test_a_second_build_reuses_the_reference_and_measures_the_same(two_builds):
    store, (first, first_log), (second, second_log) = two_builds
    assert not from_cache(first_log) and from_cache(second_log)
    assert len(list((store / ".cache" / "reference").glob("*.npz"))) == 1
    before, after = manifest(first, "t-int8")["quality"], manifest(second, "t-int8")["quality"]
    for field in ("reference_value", "value", "retention"):
        assert after[field] == before[field], field
    assert after["extra"]["mean_cosine"] == before["extra"]["mean_cosine"]
    # The server skips the hidden cache folder: the store lists only the models.
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["t-fused", "t-int8"]


def test_other_evaluation_text_is_a_miss(tmp_path, tiny_embedding_dir):
    store = tmp_path / "store"
    run_build(tmp_path, tiny_embedding_dir, store, only=["t-fused"])
    _, lines = run_build(tmp_path, tiny_embedding_dir, store, evaluation={"probe_test_samples": 41},
                         only=["t-fused"])
    assert not from_cache(lines)


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, tiny_embedding_dir):
    store = tmp_path / "store"
    first, _ = run_build(tmp_path, tiny_embedding_dir, store, only=["t-fused"])
    (entry,) = (store / ".cache" / "reference").glob("*.npz")
    entry.write_bytes(b"\0" * 100)
    second, lines = run_build(tmp_path, tiny_embedding_dir, store, only=["t-fused"])
    assert not from_cache(lines)
    assert manifest(second, "t-fused")["quality"]["reference_value"] == manifest(first, "t-fused")["quality"]["reference_value"]


def test_every_variant_is_timed_against_the_same_reference_samples(two_builds):
    _, _, (result, _) = two_builds
    fused, int8 = (manifest(result, n)["latency"]["cases"] for n in ("t-fused", "t-int8"))
    for case in ("batch1_short", "batch32_seq128"):
        assert fused[case]["reference"] == int8[case]["reference"] > 0
        assert fused[case]["variant"] > 0 and int8[case]["variant"] > 0
        # The speedup is the ratio of the unrounded medians; the rounded ones agree to well within 1%.
        for row in (fused[case], int8[case]):
            assert abs(row["speedup"] / (row["reference"] / row["variant"]) - 1) < 0.01
