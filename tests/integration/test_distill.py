"""Distillation on tiny random BERTs: the loss falls, the student moves toward its teacher, an
interrupted run resumes to the same weights, and bad settings fail before any training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import load_reference
from build_models.recipe import DistillConfig
from build_models.steps import distill
from build_models.training import loop
from service.manifest import load_verified
from tests.helpers import build_tiny_store

HELD_OUT = ["Oil prices rose sharply on Monday after the cartel agreed to cut output.",
            "Wheat exports fell for a third month as shipping costs climbed.", "Shares of the bank jumped.",
            "The central bank left interest rates unchanged."]
FAST = {"samples": 160, "batch_size": 8, "max_seq_len": 32, "learning_rate": 5e-4, "warmup_ratio": 0.0,
        "progress": False}


def context(model_dir, tmp_path, checkpoints=None) -> BuildContext:
    return BuildContext(source=None, task="embedding", tokenizer=AutoTokenizer.from_pretrained(model_dir),
                        work_dir=tmp_path, max_seq_len=64, provider="cpu", sample_texts=HELD_OUT,
                        checkpoint_dir=checkpoints)


def mean_cosine(a, b, tok, texts=HELD_OUT) -> float:
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        x = a(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        y = b(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())


def test_student_learns_toward_its_teacher(tiny_embedding_dir, tmp_path, monkeypatch):
    teacher = load_reference(tiny_embedding_dir, "embedding", "mean", True)
    tok = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    cfg = DistillConfig(num_layers=1, epochs=2, **FAST)
    # A tiny random BERT's single layer already agrees with its teacher to 0.9999; start the student
    # visibly off (noise on its layer) so that learning toward the teacher is measurable.
    make_student = distill.make_student

    def noisy_student(model, keep):
        student = make_student(model, keep)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in student.encoder.encoder.layer.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        return student

    monkeypatch.setattr(distill, "make_student", noisy_student)
    untrained = noisy_student(teacher, distill.student_layers(cfg, 2)).eval()
    before = mean_cosine(untrained, teacher, tok)
    art, details = distill.run(cfg, Artifact(kind="torch", module=teacher), context(tiny_embedding_dir, tmp_path))
    assert details["student_layers"] == [1] and len(art.module.encoder.encoder.layer) == 1
    assert details["loss_last"] < details["loss_first"], details
    after = mean_cosine(art.module, teacher, tok)
    assert after > before + 0.5 * (1 - before), (before, after)  # at least half the gap closed
    assert art.module.encoder.config.num_hidden_layers == 1


def test_classifier_distills_with_kl_and_its_own_labels(tiny_classifier_dir, tmp_path):
    teacher = load_reference(tiny_classifier_dir, "classification", None, False)
    cfg = DistillConfig(num_layers=1, **FAST)
    art, details = distill.run(cfg, Artifact(kind="torch", module=teacher), context(tiny_classifier_dir, tmp_path))
    assert details["used_labels"] is True  # the tiny classifier's labels are R8's
    assert details["loss_last"] < details["loss_first"], details


def test_interrupted_run_resumes_to_the_same_weights(tiny_embedding_dir, tmp_path, monkeypatch):
    cfg = DistillConfig(num_layers=1, checkpoint_every=5, **FAST)  # 20 steps

    def fresh():
        return Artifact(kind="torch", module=load_reference(tiny_embedding_dir, "embedding", "mean", True))

    straight, _ = distill.run(cfg, fresh(), context(tiny_embedding_dir, tmp_path / "a", tmp_path / "ck-a"))

    def stop_at_7(step):
        if step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "after_step", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg, fresh(), context(tiny_embedding_dir, tmp_path / "b", tmp_path / "ck-b"))
    monkeypatch.setattr(loop, "after_step", lambda step: None)
    resumed, details = distill.run(cfg, fresh(), context(tiny_embedding_dir, tmp_path / "b", tmp_path / "ck-b"))
    assert details["resumed_at_step"] == 5
    for (name, a), (_, b) in zip(straight.module.state_dict().items(), resumed.module.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_bad_settings_fail_before_training(tiny_embedding_dir, tmp_path, monkeypatch):
    ctx = context(tiny_embedding_dir, tmp_path)

    def teacher():
        return Artifact(kind="torch", module=load_reference(tiny_embedding_dir, "embedding", "mean", True))

    with pytest.raises(BuildError, match="student of 3 layers is larger than its teacher of 2"):
        distill.run(DistillConfig(num_layers=3, **FAST), teacher(), ctx)
    with pytest.raises(BuildError, match=r"layers \[5\] do not exist"):
        distill.run(DistillConfig(layers=[0, 5], **FAST), teacher(), ctx)
    with pytest.raises(BuildError, match="need at least one batch"):
        distill.run(DistillConfig(num_layers=1, **{**FAST, "samples": 4}), teacher(), ctx)
    with pytest.raises(ValueError, match="exactly one of num_layers or layers"):
        DistillConfig(num_layers=1, layers=[1])
    monkeypatch.setattr(distill.DistillTask, "loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(BuildError, match="loss became nan at step 1"):
        distill.run(DistillConfig(num_layers=1, **FAST), teacher(), ctx)


def test_distilled_student_exports_fuses_and_publishes(tiny_embedding_dir, tmp_path):
    store = build_tiny_store(tmp_path, tiny_embedding_dir, [{"name": "student", "steps": [
        {"distill": {"num_layers": 1, **FAST}}, {"export_onnx": {}}, {"optimize": {}}]}])
    steps = {s.name: s for s in load_verified(store / "student" / "1").lineage.steps}
    assert steps["distill"].details["student_layers"] == [1]
    assert steps["optimize"].details["fused_nodes"]["Attention"] == 1
    assert steps["optimize"].details["max_abs_diff_vs_torch"] < 1e-4
    assert (store / ".checkpoints").is_dir()  # resumable, and invisible to the server's store scan


def test_tinybert_losses_compare_the_heads_a_pruned_student_kept(tiny_embedding_dir):
    """A student that is its teacher with two heads pruned, where the teacher's two heads add nothing
    (their output columns zeroed), has the teacher's hidden states and, head for head, its attention
    maps: the hidden-state and attention losses are zero only when the kept heads are matched right."""
    import copy

    teacher = load_reference(tiny_embedding_dir, "embedding", "mean", True).eval()
    head = teacher.encoder.config.hidden_size // teacher.encoder.config.num_attention_heads
    with torch.no_grad():
        attention = teacher.encoder.encoder.layer[0].attention
        # A random tiny BERT attends almost uniformly; sharpen it so that heads differ visibly.
        for proj in (attention.self.query, attention.self.key):
            proj.weight.mul_(30)
        out = attention.output.dense.weight
        for h in (1, 3):
            out[:, h * head:(h + 1) * head] = 0
    student = copy.deepcopy(teacher)
    student.encoder.prune_heads({0: [1, 3]})
    heads = distill.kept_heads(student, 4)
    assert heads == [[0, 2], [0, 1, 2, 3]]
    tok = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    cfg = DistillConfig(num_layers=2, attention_loss_weight=1.0, hidden_loss_weight=1.0, **FAST)
    rows = list(range(len(HELD_OUT)))

    def loss(kept):
        task = distill.DistillTask(cfg, teacher, [0, 1], tok, HELD_OUT, None, "cpu", kept)
        inputs = task.inputs(rows)
        forward = distill.StudentForward(student, task.carry_hidden, task.carry_attention)
        with torch.no_grad():
            output = forward(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
            return float(task.loss(output, task.target(rows, inputs)))

    assert loss(heads) < 1e-6
    assert loss([[0, 1], [0, 1, 2, 3]]) > 1e-3  # the wrong teacher heads


def test_classifier_student_trains_with_the_tinybert_losses(tiny_classifier_dir, tmp_path):
    teacher = load_reference(tiny_classifier_dir, "classification", None, False)
    cfg = DistillConfig(num_layers=1, hidden_loss_weight=1.0, attention_loss_weight=1.0, **FAST)
    art, details = distill.run(cfg, Artifact(kind="torch", module=teacher), context(tiny_classifier_dir, tmp_path))
    assert details["loss_last"] < details["loss_first"], details
    with pytest.raises(ValueError, match="attention loss runs with the single or ddp strategy, not pipeline"):
        DistillConfig(num_layers=1, attention_loss_weight=1.0, strategy="pipeline", **FAST)


def test_broad_text_student_is_gated_on_a_held_out_corpus(tiny_embedding_dir, tmp_path):
    """A student distilled on a mix of corpora, never the held-out one, is scored on both corpora; the
    manifest, its gates and `build-models list` show both, and the evaluation's texts were left out."""
    import yaml

    from build_models.catalog import render_table
    from build_models.pipeline import build
    from tests.helpers import tiny_recipe

    recipe = tiny_recipe(tiny_embedding_dir, [{"name": "student", "steps": [
        {"distill": {"num_layers": 1, **FAST, "dataset": ["reuters-r8", "election-tweets", "friends-transcripts"],
                     "attention_loss_weight": 1.0}},
        {"export_onnx": {}}]}])
    recipe["evaluation"]["held_out"] = {"dataset": "20newsgroups", "probe_train_samples": 60,
                                        "probe_test_samples": 40}
    recipe["gates"] = {"downstream_retention": 0.0, "mean_cosine": 0.0}  # rows recorded, never failing
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    build(tmp_path / "recipe.yaml", tmp_path / "store", log=lambda _m: None)
    manifest = load_verified(tmp_path / "store" / "student" / "1")
    held_out = manifest.quality.held_out
    assert held_out.dataset == "20newsgroups" and 35 <= held_out.test_samples <= 40  # stratified, rounded
    assert 0 < held_out.retention and 0 < held_out.knn_retention and -1 <= held_out.mean_cosine <= 1
    assert {g.metric for g in manifest.quality.gates} == {
        "downstream_retention", "held_out_retention", "held_out_knn_retention", "mean_cosine",
        "held_out_mean_cosine"}
    details = {s.name: s.details for s in manifest.lineage.steps}["distill"]
    assert details["mix"]["per_source"] == {"reuters-r8": 54, "election-tweets": 53, "friends-transcripts": 53}
    assert details["mix"]["evaluation_texts_excluded"] > 0  # R8's probe texts and its test split
    assert "20newsgroups" in render_table(tmp_path / "store")
