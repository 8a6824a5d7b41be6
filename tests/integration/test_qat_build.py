"""Ternary and binary students through the real build (qat -> export_onnx -> optimize with the
projections kept -> quantize int2_weight_only) on tiny random BERTs: the published graphs hold 2-bit
MatMulNBits for the attention and FFN projections, compute what the frozen PyTorch student computes,
record their steps, and serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from build_models.pipeline import build
from build_models.steps import qat as qat_step
from service.manifest import load_verified
from tests.helpers import tiny_recipe
from tests.integration.helpers import run_variant

# 64 texts in batches of 8: 8 steps, seconds on a tiny BERT. Quality is meaningless at this size; the
# tests check the plumbing and the arithmetic, not what the student learnt.
FAST = {"samples": 64, "batch_size": 8, "max_seq_len": 32, "learning_rate": 5e-4, "warmup_ratio": 0.0,
        "progress": False}
EXPORT = [{"export_onnx": {}}, {"optimize": {"attention": "multi_head"}}]
TERNARY = {"qat": {"weights": "ternary", "granularity": "block", "block_size": 32, "hidden_loss_weight": 1.0, **FAST}}
VARIANTS = [
    # Every projection ternary, one α per block of 32, fp32 activations at inference.
    {"name": "tiny-ternary", "steps": [
        TERNARY, *EXPORT, {"quantize": {"method": "int2_weight_only", "block_size": 32}}]},
    # Binary per channel with the first layer kept fp32, int8 activations and embedding tables.
    {"name": "tiny-binary", "steps": [
        {"qat": {"weights": "binary", "keep_fp32": ["*.layer.0.*"], **FAST}},
        *EXPORT, {"quantize": {"method": "int2_weight_only", "block_size": 32, "accuracy_level": 4,
                               "embeddings": "int8"}}]},
    # The ternary student again (its qat and export reused from the first variant, so no new training),
    # with ORT's default fused Attention: the packed Q/K/V weights cannot become MatMulNBits.
    {"name": "tiny-ternary-fused", "steps": [
        TERNARY, {"export_onnx": {}}, {"optimize": {}},
        {"quantize": {"method": "int2_weight_only", "block_size": 32}}]},
]
TEXTS = ["Oil prices rose sharply on Monday after the cartel agreed to cut output.", "ok",
         "Wheat exports fell for a third month as shipping costs climbed and demand from importers weakened.",
         "Rates unchanged."]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_embedding_dir):
    """The store, and each variant's frozen PyTorch student as the qat step returned it (the last
    variant reuses the first one's, so the step runs twice)."""
    tmp = tmp_path_factory.mktemp("qat-build")
    frozen: list[torch.nn.Module] = []
    real_freeze = qat_step.freeze

    def keep_frozen(model):
        frozen.append(real_freeze(model))
        return frozen[-1]

    (tmp / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_embedding_dir, VARIANTS)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qat_step, "freeze", keep_frozen)
        result = build(tmp / "recipe.yaml", tmp / "store", log=lambda _m: None)
    assert all(o.published for o in result.outcomes)
    return tmp / "store", dict(zip([v["name"] for v in VARIANTS], frozen))


def feeds(model_dir: Path, texts=TEXTS) -> dict[str, np.ndarray]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {k: v.astype(np.int64) for k, v in tok(texts, padding=True, return_tensors="np").items()}


def torch_outputs(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(batch[n]) for n in ("input_ids", "attention_mask", "token_type_ids"))).numpy()


def test_projections_are_two_bit_matmul_nbits(built):
    store, _ = built
    counts = {}
    for name in ("tiny-ternary", "tiny-binary", "tiny-ternary-fused"):
        graph = onnx.load(str(store / name / "1" / "model.onnx")).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert all(a.i == 2 for n in nbits for a in n.attribute if a.name == "bits")
        inits = {t.name for t in graph.initializer}
        counts[name] = (len(nbits), sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits),
                        sum(1 for n in graph.node if n.op_type in ("MultiHeadAttention", "Attention")))
    # 2 layers x (query, key, value, attention output, FFN in, FFN out); layer 0 kept fp32 in binary;
    # with fused Attention only the attention output and the FFN (3 a layer) are MatMuls left to convert.
    assert counts == {"tiny-ternary": (12, 0, 2), "tiny-binary": (6, 6, 2), "tiny-ternary-fused": (6, 0, 2)}
    fused = {s.name: s.details for s in load_verified(store / "tiny-ternary-fused" / "1").lineage.steps}
    assert "attention: multi_head" in fused["quantize"]["note"]


def test_manifest_records_the_steps(built):
    store, _ = built
    manifest = load_verified(store / "tiny-ternary" / "1")
    assert manifest.precision == "int2" and manifest.fused_nodes["MatMulNBits"] == 12
    steps = {s.name: s for s in manifest.lineage.steps}
    assert list(steps) == ["qat", "export_onnx", "optimize", "quantize"]
    qat = steps["qat"].details
    assert (qat["weights"], qat["granularity"], qat["block_size"]) == ("ternary", "block", 32)
    assert qat["replaced_modules"] == 12
    assert qat["kept_fp32_modules"] == [] and qat["student_layers"] == [0, 1] and qat["steps"] == 8
    assert qat["bits_per_weight"] == pytest.approx(np.log2(3) + 1, abs=1e-4)  # + one fp32 α per 32 weights
    assert steps["optimize"].details["attention"] == "multi_head"
    quant = steps["quantize"].details
    assert (quant["bits"], quant["matmul_nbits_nodes"], quant["matmuls_kept_fp32"]) == (2, 12, 0)
    assert quant["max_abs_diff_vs_torch"] < 1e-4
    binary = {s.name: s.details for s in load_verified(store / "tiny-binary" / "1").lineage.steps}
    assert binary["qat"]["replaced_modules"] == 6 and len(binary["qat"]["kept_fp32_modules"]) == 6
    assert binary["quantize"]["matmuls_kept_fp32"] == 6 and binary["quantize"]["accuracy_level"] == 4
    assert quant["embeddings"] == "fp32" and binary["quantize"]["embeddings"] == "int8"


def test_int8_embeddings_store_the_tables_in_8_bits(built):
    store, _ = built
    def tables(name):
        graph = onnx.load(str(store / name / "1" / "model.onnx")).graph
        inits = {t.name: t for t in graph.initializer}
        (node,) = [n for n in graph.node if n.op_type.endswith("EmbedLayerNormalization")]
        # inputs 2..4: the word, position and segment tables (quantized: their int8 codes)
        return node.op_type, [onnx.helper.tensor_dtype_to_np_dtype(inits[i].data_type) for i in node.input[2:5]]
    assert tables("tiny-ternary") == ("EmbedLayerNormalization", [np.float32] * 3)
    op, dtypes = tables("tiny-binary")
    assert op == "QEmbedLayerNormalization" and all(d.itemsize == 1 for d in dtypes), dtypes


def test_published_graphs_compute_the_frozen_student(built, tiny_embedding_dir):
    store, frozen = built
    batch = feeds(tiny_embedding_dir)
    assert batch["attention_mask"].min() == 0, "the batch must contain padding"
    # fp32 activations: the same weights and fp32 arithmetic, only the fused kernels' summation order
    # differs, as in export_onnx's own check (1e-4).
    want = torch_outputs(frozen["tiny-ternary"], batch)
    np.testing.assert_allclose(run_variant(store / "tiny-ternary" / "1", batch), want, atol=1e-4)
    # int8 activations (accuracy_level 4): one int8 step per block of 32 activations, through 6 2-bit
    # products, and int8 embedding tables move the unit-length embedding a little; direction kept.
    want = torch_outputs(frozen["tiny-binary"], batch)
    got = run_variant(store / "tiny-binary" / "1", batch)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99 and np.abs(got - want).max() < 0.05, (cosine, np.abs(got - want).max())


def test_two_bit_variant_serves_embeddings(built, tiny_embedding_dir):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    store, frozen = built
    settings = ServiceSettings(model_store=store, default_model="tiny-ternary", intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/embeddings", json={"model": "tiny-ternary", "input": TEXTS})
        assert r.status_code == 200, r.text
        got = np.array([row["embedding"] for row in r.json()["data"]], dtype=np.float32)
    # Each text alone, unpadded, as the server runs it; fp32 2-bit path, so within the export tolerance.
    want = np.concatenate([torch_outputs(frozen["tiny-ternary"], feeds(tiny_embedding_dir, [t])) for t in TEXTS])
    np.testing.assert_allclose(got, want, atol=1e-4)


def context(model_dir: Path, tmp_path: Path, task: str = "embedding", checkpoints: Path | None = None):
    from build_models.artifact import BuildContext

    return BuildContext(source=None, task=task, tokenizer=AutoTokenizer.from_pretrained(model_dir), work_dir=tmp_path,
                        max_seq_len=64, provider="cpu", sample_texts=TEXTS, checkpoint_dir=checkpoints)


def test_interrupted_qat_resumes_to_the_same_weights(tiny_embedding_dir, tmp_path, monkeypatch):
    from build_models.artifact import Artifact
    from build_models.modeling import load_reference
    from build_models.recipe import QatConfig
    from build_models.training import loop

    cfg = QatConfig(weights="ternary", checkpoint_every=3, **FAST)  # 8 steps

    def fresh():
        return Artifact(kind="torch", module=load_reference(tiny_embedding_dir, "embedding", "mean", True))

    straight, _ = qat_step.run(cfg, fresh(), context(tiny_embedding_dir, tmp_path / "a", checkpoints=tmp_path / "ck-a"))

    def stop_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "after_step", stop_at_4)
    interrupted = context(tiny_embedding_dir, tmp_path / "b", checkpoints=tmp_path / "ck-b")
    with pytest.raises(KeyboardInterrupt):
        qat_step.run(cfg, fresh(), interrupted)
    monkeypatch.setattr(loop, "after_step", lambda step: None)
    assert [p.name.split("-")[0] for p in (tmp_path / "ck-b").iterdir()] == ["qat"]
    resumed, details = qat_step.run(cfg, fresh(), interrupted)
    assert details["resumed_at_step"] == 3
    for (name, a), (_, b) in zip(straight.module.state_dict().items(), resumed.module.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_classifier_keeps_its_head_and_pooler_fp32(tiny_classifier_dir, tmp_path):
    from build_models.artifact import Artifact
    from build_models.modeling import load_reference
    from build_models.recipe import QatConfig
    from build_models.steps.quantize import two_bit_grid

    teacher = load_reference(tiny_classifier_dir, "classification", None, False)
    cfg = QatConfig(weights="binary", granularity="block", block_size=16, **FAST)
    art, details = qat_step.run(cfg, Artifact(kind="torch", module=teacher),
                                context(tiny_classifier_dir, tmp_path, "classification"))
    assert details["replaced_modules"] == 12
    assert details["used_labels"] is True  # the tiny classifier's labels are R8's
    bert = art.module.classifier.bert
    assert two_bit_grid(bert.encoder.layer[1].output.dense.weight.numpy().T, 16) is not None
    for head in (bert.pooler.dense, art.module.classifier.classifier):
        assert two_bit_grid(head.weight.numpy().T, 16) is None  # untouched fp32 weights


def test_bad_settings_fail_before_training(tiny_embedding_dir, tmp_path):
    from build_models.artifact import Artifact
    from build_models.errors import BuildError
    from build_models.modeling import load_reference
    from build_models.recipe import QatConfig

    art = Artifact(kind="torch", module=load_reference(tiny_embedding_dir, "embedding", "mean", True))
    ctx = context(tiny_embedding_dir, tmp_path)
    with pytest.raises(BuildError, match="qat trains with the single or ddp strategy .*not pipeline"):
        qat_step.run(QatConfig(weights="ternary", strategy="pipeline", **FAST), art, ctx)
    with pytest.raises(BuildError, match="keeps every projection"):
        qat_step.run(QatConfig(weights="ternary", keep_fp32=["*"], **FAST), art, ctx)
    with pytest.raises(BuildError, match="qat: keep_fp32 pattern '\\*.layer.9.\\*' matches no projection"):
        qat_step.run(QatConfig(weights="ternary", keep_fp32=["*.layer.9.*"], **FAST), art, ctx)
    with pytest.raises(BuildError, match="qat needs the PyTorch model"):
        qat_step.run(QatConfig(weights="ternary", **FAST), Artifact(kind="onnx"), ctx)


def test_ternary_classifier_builds_and_predicts(tiny_classifier_dir, tmp_path):
    """news-classifier.yaml's news-ternary on a tiny classifier: qat against the teacher's logits and
    the corpus labels, 2-bit projections with int8 embedding tables and an fp32 head; /predict answers
    with the classifier's labels."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    recipe = tiny_recipe(tiny_classifier_dir, [{"name": "clf-ternary", "steps": [
        TERNARY, *EXPORT, {"quantize": {"method": "int2_weight_only", "block_size": 32, "accuracy_level": 4,
                                        "embeddings": "int8"}}]}])
    recipe["task"] = "classification"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    build(tmp_path / "recipe.yaml", tmp_path / "store", log=lambda _m: None)
    manifest = load_verified(tmp_path / "store" / "clf-ternary" / "1")
    steps = {s.name: s.details for s in manifest.lineage.steps}
    assert manifest.task == "classification" and manifest.precision == "int2"
    assert steps["qat"]["used_labels"] and steps["qat"]["replaced_modules"] == 12
    assert steps["quantize"]["matmul_nbits_nodes"] == 12 and steps["quantize"]["embeddings"] == "int8"
    labels = list(manifest.labels)
    settings = ServiceSettings(model_store=tmp_path / "store", default_model="clf-ternary", intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        r = client.post("/predict", json={"inputs": TEXTS[:2], "model": "clf-ternary"})
    assert r.status_code == 200, r.text
    rows = r.json()
    assert len(rows) == 2 and all({s["label"] for s in row} == set(labels) for row in rows)
    assert all(abs(sum(s["score"] for s in row) - 1) < 1e-4 for row in rows)
