"""Fine-tuning a teacher classifier from an encoder with no classification head, in a recipe's
teacher section: the labels come from the corpus, variants are measured against the teacher and a
distilled student learns from it."""

from __future__ import annotations

import pytest
import yaml

from build_models.errors import BuildError, RecipeError
from build_models.pipeline import build
from build_models.recipe import parse_recipe
from service.manifest import load_verified
from tests.helpers import R8_LABELS

FINETUNE = {"samples": 960, "epochs": 3, "batch_size": 16, "max_seq_len": 48, "learning_rate": 5e-3,
            "warmup_ratio": 0.0, "progress": False}


def classifier_recipe(source, variants, **finetune) -> dict:
    return {"family": "news", "source": {"path": str(source)}, "task": "classification", "max_seq_len": 64,
            "teacher": [{"finetune": {**FINETUNE, **finetune}}],
            "evaluation": {"probe_test_samples": 200, "latency_repeats": 1},
            "gates": {"downstream_retention": None}, "variants": variants}


def test_finetuned_teacher_and_its_distilled_student_publish(tiny_embedding_dir, tmp_path):
    recipe = tmp_path / "news.yaml"
    recipe.write_text(yaml.safe_dump(classifier_recipe(tiny_embedding_dir, [
        {"name": "news-teacher", "steps": [{"export_onnx": {}}]},
        {"name": "news-student", "steps": [
            {"distill": {"num_layers": 1, "samples": 160, "batch_size": 16, "max_seq_len": 48,
                         "learning_rate": 1e-3, "progress": False}}, {"export_onnx": {}}]},
    ])))
    result = build(recipe, tmp_path / "store", log=lambda _m: None)
    assert [o.published for o in result.outcomes] == [True, True]

    teacher = load_verified(tmp_path / "store" / "news-teacher" / "1")
    assert teacher.task == "classification" and teacher.labels == sorted(R8_LABELS)
    finetune = teacher.lineage.steps[0]
    assert finetune.name == "finetune" and finetune.details["teacher"] is True
    assert finetune.details["loss_last"] < finetune.details["loss_first"], finetune.details
    assert set(finetune.details["examples_per_label"]) == set(R8_LABELS)
    # The exported teacher is the reference itself: same accuracy, full agreement.
    assert teacher.quality.value == pytest.approx(teacher.quality.reference_value, abs=1e-6)
    assert teacher.quality.extra["agreement"] == 1.0
    # Better than always answering the most common R8 label ("earn", about half the test split).
    assert teacher.quality.reference_value > 0.6, teacher.quality

    student = load_verified(tmp_path / "store" / "news-student" / "1")
    steps = {s.name: s.details for s in student.lineage.steps}
    assert steps["distill"]["used_labels"] is True and steps["distill"]["student_layers"] == [1]
    assert steps["distill"]["teacher"] == "reference"
    assert student.quality.reference_value == teacher.quality.reference_value


def test_bad_teacher_settings_fail_early(tiny_embedding_dir, tmp_path):
    with pytest.raises(RecipeError, match="finetune teacher step makes a classifier: set task: classification"):
        parse_recipe({**classifier_recipe(tiny_embedding_dir, [{"name": "x", "steps": [{"export_onnx": {}}]}]),
                      "task": "embedding"})
    recipe = tmp_path / "few.yaml"
    recipe.write_text(yaml.safe_dump(classifier_recipe(
        tiny_embedding_dir, [{"name": "x", "steps": [{"export_onnx": {}}]}], samples=8)))
    with pytest.raises(BuildError, match="finetune: 8 training texts in reuters-r8; need at least one batch of 16"):
        build(recipe, tmp_path / "store", log=lambda _m: None)
