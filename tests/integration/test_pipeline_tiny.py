"""Every step on a tiny random BERT: outputs of each published variant match PyTorch."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

from build_models.pipeline import build
from service.manifest import load_verified
from tests.helpers import R8_LABELS
from tests.integration.helpers import run_variant

FAST_EVAL = {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1, "threads": 2}


def write_recipe(tmp_path: Path, source: Path, task: str, variants: list, gates=None, **evaluation) -> Path:
    recipe = {"family": "tiny", "source": {"path": str(source)}, "task": task, "max_seq_len": 64,
              "evaluation": {**FAST_EVAL, **evaluation}, "gates": gates or {"downstream_retention": None, "mean_cosine": None},
              "variants": variants}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


EMBEDDING_VARIANTS = [
    {"name": "e-onnx", "steps": [{"export_onnx": {}}]},
    {"name": "e-fused", "steps": [{"export_onnx": {}}, {"optimize": {}}]},
    {"name": "e-int8", "steps": [{"export_onnx": {}}, {"optimize": {}}, {"quantize": {"method": "int8_dynamic"}}]},
    {"name": "e-int4", "steps": [{"export_onnx": {}}, {"quantize": {"method": "int4_weight_only", "block_size": 16}}]},
    {"name": "e-fp16", "provider": "cuda", "steps": [{"export_onnx": {}}, {"optimize": {}}, {"quantize": {"method": "fp16"}}]},
    {"name": "e-ts", "steps": ["export_torchscript"]},
    {"name": "e-ts-int8", "steps": [{"quantize": {}}, "export_torchscript"]},
]

# (max abs difference, min cosine) allowed against PyTorch fp32, per precision.
TOLERANCE = {"fp32": (1e-4, 0.99999), "fp16": (1e-2, 0.999), "int8": (None, 0.98), "int4": (None, 0.95)}


@pytest.fixture(scope="module")
def embedding_store(tmp_path_factory, tiny_embedding_dir):
    tmp = tmp_path_factory.mktemp("embedding-build")
    recipe = write_recipe(tmp, tiny_embedding_dir, "embedding", EMBEDDING_VARIANTS, speed_baseline="e-fused")
    result = build(recipe, tmp / "store", log=lambda _m: None)
    assert all(o.published for o in result.outcomes)
    return tmp / "store"


def reference_embeddings(model_dir: Path, texts: list[str]) -> tuple[dict, np.ndarray]:
    """Mean pooling and L2 normalization computed here, independently of build_models.modeling."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return {k: v.numpy() for k, v in enc.items()}, pooled.numpy()


@pytest.mark.parametrize("name", [v["name"] for v in EMBEDDING_VARIANTS])
def test_variant_matches_pytorch_on_mixed_lengths(embedding_store, tiny_embedding_dir, mixed_batch, name):
    variant_dir = embedding_store / name / "1"
    manifest = load_verified(variant_dir)
    feeds, expected = reference_embeddings(tiny_embedding_dir, mixed_batch)
    assert feeds["attention_mask"].min() == 0, "the batch must contain padding"
    got = run_variant(variant_dir, feeds)
    assert got.shape == expected.shape == (4, 32)
    atol, min_cos = TOLERANCE[manifest.precision]
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= min_cos, (name, cos)
    if atol is not None:
        np.testing.assert_allclose(got, expected, atol=atol)
    # Each item is independent of its batch-mates and padding: run them one at a time too.
    for i, text in enumerate(mixed_batch):
        single, _ = reference_embeddings(tiny_embedding_dir, [text])
        alone = run_variant(variant_dir, single)[0]
        np.testing.assert_allclose(alone, got[i], atol=1e-3 if manifest.precision != "fp32" else 1e-5)


def test_manifests_record_how_and_what(embedding_store):
    fused = load_verified(embedding_store / "e-fused" / "1")
    assert fused.format == "onnx" and fused.precision == "fp32"
    assert fused.fused_nodes.get("Attention") == 2 and fused.fused_nodes.get("SkipLayerNormalization", 0) >= 3
    assert [s.name for s in fused.lineage.steps] == ["export_onnx", "optimize"]
    assert fused.lineage.steps[0].params["opset"] == 17
    assert fused.pooling == "mean" and fused.normalize is True and fused.embedding_dim == 32
    assert fused.max_seq_len == 64
    assert {"mean_cosine", "min_cosine"} <= set(fused.quality.extra)
    assert fused.quality.reference_value is not None and fused.quality.retention is not None
    assert set(fused.latency.cases) == {"batch1_short", "batch32_seq128"}
    assert fused.latency.cases["batch32_seq128"]["reference"] > 0

    int8 = load_verified(embedding_store / "e-int8" / "1")
    quant = int8.lineage.steps[-1]
    assert quant.params["per_channel"] is True and "reduce_range" in quant.details
    assert int8.fused_nodes.get("Attention") == 2
    ops = {n.op_type for n in onnx.load(str(embedding_store / "e-int8/1/model.onnx")).graph.node}
    assert "QAttention" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)

    int4 = load_verified(embedding_store / "e-int4" / "1")
    assert int4.precision == "int4" and int4.fused_nodes["MatMulNBits"] > 0

    fp16 = load_verified(embedding_store / "e-fp16" / "1")
    assert fp16.providers == ["CUDAExecutionProvider"]
    graph = onnx.load(str(embedding_store / "e-fp16/1/model.onnx")).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types

    ts = load_verified(embedding_store / "e-ts-int8" / "1")
    assert ts.format == "torchscript" and ts.precision == "int8"
    assert [s.name for s in ts.lineage.steps] == ["quantize", "export_torchscript"]
    opset = onnx.load(str(embedding_store / "e-onnx/1/model.onnx")).opset_import
    assert any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in opset)


@pytest.mark.parametrize("name", [v["name"] for v in EMBEDDING_VARIANTS])
def test_every_embedding_variant_records_ranges_and_the_cost_of_each_type(embedding_store, name):
    manifest = load_verified(embedding_store / name / "1")
    assert manifest.embedding_ranges.split == "train" and len(manifest.embedding_ranges.max) == 32
    table = manifest.quality.embedding_types
    assert [r.type for r in table.rows] == ["float32", "int8", "uint8", "binary"]
    assert all(0 <= r.recall_at_k <= 1 for r in table.rows)


def test_onnx_axes_are_dynamic(embedding_store):
    graph = onnx.load(str(embedding_store / "e-onnx/1/model.onnx")).graph
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, value.name


def test_torchscript_handles_max_seq_len_and_batch_sizes(embedding_store, tiny_embedding_dir):
    long_text = " ".join(["market"] * 200)
    feeds, expected = reference_embeddings(tiny_embedding_dir, [long_text] * 5)
    assert feeds["input_ids"].shape == (5, 64)
    got = run_variant(embedding_store / "e-ts" / "1", feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_classification_variants(tmp_path, tiny_classifier_dir, mixed_batch):
    variants = [
        {"name": "c-int8", "steps": [{"export_onnx": {}}, {"optimize": {}}, {"quantize": {}}]},
        {"name": "c-ts", "steps": ["export_torchscript"]},
    ]
    recipe = write_recipe(tmp_path, tiny_classifier_dir, "classification", variants,
                          gates={"downstream_retention": None, "mean_cosine": None, "agreement": None})
    result = build(recipe, tmp_path / "store", log=lambda _m: None)
    assert [o.published for o in result.outcomes] == [True, True]
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    enc = tok(mixed_batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    with torch.no_grad():
        expected = model(**enc).logits.numpy()
    feeds = {k: v.numpy() for k, v in enc.items()}
    for name, atol in (("c-int8", 0.05), ("c-ts", 1e-4)):
        manifest = load_verified(tmp_path / "store" / name / "1")
        assert manifest.task == "classification" and manifest.labels == R8_LABELS
        assert manifest.outputs[0].name == "logits" and manifest.outputs[0].shape == ["batch", 8]
        got = run_variant(tmp_path / "store" / name / "1", feeds)
        np.testing.assert_allclose(got, expected, atol=atol)
        quality = manifest.quality
        assert quality.metric == "accuracy" and quality.value is not None
        assert {"macro_f1", "agreement"} <= set(quality.extra)
        assert manifest.embedding_ranges is None and quality.embedding_types is None


def test_variants_are_also_timed_against_the_recipes_baseline(embedding_store):
    """evaluation.speed_baseline: every other variant's latency row says how much faster it is than the
    baseline variant, from the same probe's medians (the numbers each manifest records)."""
    base = load_verified(embedding_store / "e-fused" / "1").latency
    assert base.baseline is None and "speedup_vs_baseline" not in base.cases["batch32_seq128"]
    for name in ("e-int8", "e-onnx", "e-ts"):
        latency = load_verified(embedding_store / name / "1").latency
        assert latency.baseline == "e-fused"
        for case, row in latency.cases.items():
            assert row["speedup_vs_baseline"] == round(base.cases[case]["variant"] / row["variant"], 3)
