"""Structured pruning on tiny random BERTs: importance finds dead heads and neurons, the parameter count
drops by exactly what was removed, and pruned models save, reload, export, fuse and match PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import load_reference
from build_models.recipe import PruneConfig
from build_models.steps import prune
from service.manifest import load_verified
from tests.helpers import build_tiny_store

TEXTS = ["Oil prices rose sharply on Monday after the cartel agreed to cut output.", "ok",
         "Wheat exports fell for a third month as shipping costs climbed.", "Shares of the bank jumped."]
CALIBRATION = {"calibration_samples": 32, "batch_size": 8, "max_seq_len": 32}


def context(model_dir: Path, tmp_path: Path) -> BuildContext:
    return BuildContext(source=None, task="embedding", tokenizer=AutoTokenizer.from_pretrained(model_dir),
                        work_dir=tmp_path, max_seq_len=64, provider="cpu", sample_texts=TEXTS)


def embed(model, tok, texts=TEXTS) -> torch.Tensor:
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])


def kill(model, heads: list[int], neurons: list[int]) -> None:
    """Make heads and FFN neurons contribute nothing: zero value rows and intermediate rows."""
    with torch.no_grad():
        for layer in model.encoder.encoder.layer:
            size = layer.attention.self.attention_head_size
            for h in heads:
                layer.attention.self.value.weight[h * size:(h + 1) * size] = 0
                layer.attention.self.value.bias[h * size:(h + 1) * size] = 0
            layer.intermediate.dense.weight[neurons] = 0
            layer.intermediate.dense.bias[neurons] = 0


def test_importance_finds_dead_heads_and_neurons_and_pruning_them_changes_nothing(tiny_embedding_dir, tmp_path):
    model = load_reference(tiny_embedding_dir, "embedding", "mean", True)
    kill(model, heads=[1, 3], neurons=list(range(0, 64, 2)))
    tok = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    before = embed(model, tok)
    cfg = PruneConfig(heads_per_layer=2, ffn_dim=32, **CALIBRATION)
    head_scores, ffn_scores = prune.importance(model, cfg, context(tiny_embedding_dir, tmp_path))
    assert torch.all(head_scores[:, [1, 3]] < 1e-6) and torch.all(head_scores[:, [0, 2]] > 1e-3)
    assert torch.all(ffn_scores[:, ::2] < 1e-6)
    art, details = prune.run(cfg, Artifact(kind="torch", module=model), context(tiny_embedding_dir, tmp_path))
    assert details["removed_heads"] == {"0": [1, 3], "1": [1, 3]}
    torch.testing.assert_close(embed(art.module, tok), before, atol=1e-6, rtol=0)


def test_parameter_count_drops_by_exactly_what_was_removed(tiny_embedding_dir, tmp_path):
    model = load_reference(tiny_embedding_dir, "embedding", "mean", True)
    config = model.encoder.config
    cfg = PruneConfig(heads_per_layer=1, ffn_dim=16, **CALIBRATION)
    _, details = prune.run(cfg, Artifact(kind="torch", module=model), context(tiny_embedding_dir, tmp_path))
    head_dim = config.hidden_size // 4
    expected = prune.expected_params_removed(config.hidden_size, head_dim, heads_removed=2 * 3, ffn_removed=64 - 16,
                                             layers=2)
    assert details["params_before"] - details["params_after"] == expected
    assert all(layer.intermediate.dense.out_features == 16 for layer in model.encoder.encoder.layer)
    assert model.encoder.config.pruned_heads and model.encoder.config.intermediate_size == 16


def test_pruned_model_saves_and_reloads(tiny_embedding_dir, tmp_path):
    model = load_reference(tiny_embedding_dir, "embedding", "mean", True)
    prune.run(PruneConfig(heads_per_layer=2, ffn_dim=32, **CALIBRATION), Artifact(kind="torch", module=model),
              context(tiny_embedding_dir, tmp_path))
    model.encoder.save_pretrained(tmp_path / "pruned")
    reloaded = BertModel.from_pretrained(tmp_path / "pruned", add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).last_hidden_state, model.encoder(**enc).last_hidden_state)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "uneven"])
def test_pruned_variant_exports_fuses_and_matches_pytorch(tiny_embedding_dir, tmp_path, uniform):
    source = tmp_path / "source"
    shutil.copytree(tiny_embedding_dir, source)
    # Three dead heads in layer 0: ranked across layers, layer 0 keeps 1 head and layer 1 keeps 3.
    encoder = BertModel.from_pretrained(source, add_pooling_layer=False)
    with torch.no_grad():
        size = encoder.encoder.layer[0].attention.self.attention_head_size
        encoder.encoder.layer[0].attention.self.value.weight[: 3 * size] = 0
        encoder.encoder.layer[0].attention.self.value.bias[: 3 * size] = 0
    encoder.save_pretrained(source)
    prune_cfg = {"heads_per_layer": 2, "ffn_dim": 32, "uniform_heads": uniform, **CALIBRATION}
    store = build_tiny_store(tmp_path, source, [
        {"name": "pruned", "steps": [{"prune": prune_cfg}, {"export_onnx": {}}, {"optimize": {}}]}])
    steps = {s.name: s for s in load_verified(store / "pruned" / "1").lineage.steps}
    optimized = steps["optimize"].details
    assert optimized["fused_nodes"].get("Attention") == 2, optimized  # one per layer
    assert optimized["max_abs_diff_vs_torch"] < 1e-4
    kept = steps["prune"].details["heads_per_layer"]
    assert kept == ({"0": 2, "1": 2} if uniform else {"0": 1, "1": 3})


def test_targets_the_model_cannot_meet_are_refused(tiny_embedding_dir, tmp_path):
    ctx = context(tiny_embedding_dir, tmp_path)
    for cfg, message in ((PruneConfig(heads_per_layer=5), "more than the model's 4 heads"),
                         (PruneConfig(ffn_dim=65), "more than the model's intermediate size 64")):
        model = load_reference(tiny_embedding_dir, "embedding", "mean", True)
        with pytest.raises(BuildError, match=message):
            prune.run(cfg, Artifact(kind="torch", module=model), ctx)
    with pytest.raises(Exception, match="heads_per_layer"):
        PruneConfig(heads_per_layer=0)  # every head of a layer
    with pytest.raises(Exception, match="ratio"):
        PruneConfig(ratio=0.5, heads_per_layer=2)
    with pytest.raises(BuildError, match="before export"):
        prune.run(PruneConfig(heads_per_layer=2), Artifact(kind="onnx"), ctx)


@pytest.mark.parametrize("dataset", ["reuters-r8", ["election-tweets", "friends-transcripts"]])
def test_calibration_reads_the_named_text_and_never_the_evaluations(tiny_embedding_dir, tmp_path, dataset):
    """Importance is measured on one corpus's train split or on a mix, always without the texts the
    evaluation scores (ctx.evaluation_texts)."""
    from build_models.corpora import mixed_texts, normalized

    sources = dataset if isinstance(dataset, list) else [dataset]
    candidates = mixed_texts(sources, 64, seed=0, passage_words=None).texts
    excluded = frozenset(normalized(t) for t in candidates[:20])
    seen: list[str] = []
    tok = AutoTokenizer.from_pretrained(tiny_embedding_dir)

    def recording_tokenizer(texts, **kwargs):
        seen.extend(texts)
        return tok(texts, **kwargs)

    ctx = context(tiny_embedding_dir, tmp_path)
    ctx.tokenizer, ctx.evaluation_texts = recording_tokenizer, excluded
    cfg = PruneConfig(heads_per_layer=2, dataset=dataset, **{**CALIBRATION, "calibration_samples": 64})
    list(prune._calibration_batches(cfg, ctx))
    assert len(seen) == 64
    assert not {normalized(t) for t in seen} & excluded
    if isinstance(dataset, list):
        tweets = {normalized(t) for t in mixed_texts(["election-tweets"], 10_000, seed=0).texts}
        assert 0 < sum(normalized(t) in tweets for t in seen) < 64  # both sources contribute
