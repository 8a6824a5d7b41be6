"""Data-parallel distillation under torchrun: two CPU processes (gloo) train the same student as one
process with the same global batch, only rank 0 publishes, and ranks that disagree stop early."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from build_models.errors import BuildError
from build_models.training.distributed import World
from build_models.training.strategy import resolve_strategy
from service.manifest import load_verified
from tests.helpers import tiny_recipe

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
DISTILL = {"num_layers": 1, "samples": 96, "batch_size": 8, "max_seq_len": 32, "learning_rate": 5e-4,
           "warmup_ratio": 0.0, "hidden_loss_weight": 0.5, "checkpoint_every": 100, "progress": False}


@pytest.fixture(scope="module")
def dropout_free_source(tiny_embedding_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint without dropout: random masks would differ between one and two processes."""
    path = tmp_path_factory.mktemp("no-dropout") / "model"
    shutil.copytree(tiny_embedding_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_recipe(path: Path, source: Path, **distill) -> Path:
    student = {"name": "student", "steps": [{"distill": {**DISTILL, **distill}}, {"export_onnx": {}}]}
    path.write_text(yaml.safe_dump(tiny_recipe(source, [student])))
    return path


def run_build(args: list[str], launcher: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*launcher, "-m", "build_models.cli", "build", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def final_student(store: Path) -> dict[str, torch.Tensor]:
    (checkpoint,) = (store / ".checkpoints").glob("distill-*.pt")
    return torch.load(checkpoint, weights_only=True)["model"]


def test_two_ranks_train_the_same_student_as_one_process(dropout_free_source, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", dropout_free_source)
    single = run_build([str(recipe), "--store", str(tmp_path / "one")], [sys.executable])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_build([str(recipe), "--store", str(tmp_path / "two")], TORCHRUN)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = final_student(tmp_path / "one"), final_student(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        # Same global batch, gradients averaged over the two halves: the same updates up to float
        # summation order (12 AdamW steps).
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-5, msg=name)
    first = torch.load(next((tmp_path / "one" / ".checkpoints").glob("*.pt")), weights_only=True)
    assert first["step"] == 12

    versions = sorted(p.name for p in (tmp_path / "two" / "student").iterdir() if not p.name.startswith("."))
    assert versions == ["1"]  # rank 0 alone published
    details = {s.name: s.details for s in load_verified(tmp_path / "two" / "student" / "1").lineage.steps}
    assert details["distill"]["strategy"] == "ddp" and details["distill"]["world_size"] == 2
    assert details["distill"]["rows_per_rank"] == 4  # each rank computed half of every batch of 8
    # Every gradient crossed once per step: 4 bytes x parameters per rank, 2(N-1) of that on the wire.
    assert details["distill"]["allreduce_bytes_per_rank"] == 4 * details["distill"]["params"]
    assert details["distill"]["bytes_per_step"] == 2 * 4 * details["distill"]["params"]
    assert len(details["distill"]["peak_rss_mb_per_rank"]) == 2 and min(details["distill"]["peak_rss_mb_per_rank"]) > 50
    single_details = {s.name: s.details for s in load_verified(tmp_path / "one" / "student" / "1").lineage.steps}
    assert single_details["distill"]["strategy"] == "single" and single_details["distill"]["rows_per_rank"] == 8
    assert abs(details["distill"]["loss_last"] - single_details["distill"]["loss_last"]) < 1e-4


def test_ranks_that_disagree_on_the_recipe_stop_before_training(dropout_free_source, tmp_path):
    write_recipe(tmp_path / "a.yaml", dropout_free_source)
    write_recipe(tmp_path / "b.yaml", dropout_free_source, learning_rate=1e-3)
    # Each rank reads its own file, as on two machines whose checkouts drifted apart.
    launcher = tmp_path / "per_rank.py"
    launcher.write_text("import os, sys\nfrom build_models.cli import main\n"
                        f"recipe = {str(tmp_path / 'a.yaml')!r} if os.environ['RANK'] == '0' else {str(tmp_path / 'b.yaml')!r}\n"
                        f"sys.exit(main(['build', recipe, '--store', {str(tmp_path / 'store')!r}]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, str(launcher)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "ranks disagree on the recipe: rank(s) [1] differ from rank 0" in out, out[-3000:]
    assert not (tmp_path / "store" / "student").exists()


def test_a_rank_that_dies_mid_run_ends_the_build_with_a_message_not_a_hang(dropout_free_source, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", dropout_free_source)
    # Rank 1 vanishes after its second step, as a killed or crashed machine would, without a word.
    launcher = tmp_path / "dies.py"
    launcher.write_text("import os, sys\nfrom build_models.cli import main\nfrom build_models.training import loop\n"
                        "if os.environ['RANK'] == '1':\n"
                        "    loop.after_step = lambda step: os._exit(3) if step == 2 else None\n"
                        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, str(launcher), "build", str(recipe), "--store", str(tmp_path / "store"),
                           "--dist-timeout", "60"], env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    # The survivor says why it stops: it lost its peer, or torchrun ended it after the failure.
    assert ("rank 0: lost contact with another rank" in out
            or "[rank 0] stopped: the launcher ended this rank" in out), out[-3000:]
    assert "exitcode  : 3" in out  # torchrun's summary names the rank that failed first
    assert not (tmp_path / "store" / "student").exists()


def test_world_checks_fail_fast_without_processes():
    two = World(rank=0, size=2, backend=None)  # what each rank of a torchrun world of 2 sees
    with pytest.raises(BuildError, match="batch_size 9 does not split evenly over 2 ranks"):
        resolve_strategy("ddp", two, 9, "distill")
    with pytest.raises(BuildError, match="strategy 'single' cannot use the 2 processes"):
        resolve_strategy("single", two, 8, "distill")
    with pytest.raises(BuildError, match="unknown strategy 'ring'"):
        resolve_strategy("ring", two, 8, "distill")
    assert resolve_strategy("auto", two, 8, "distill").name == "ddp"
    assert resolve_strategy("auto", World(), 9, "distill").name == "single"
    with pytest.raises(BuildError, match="WORLD_SIZE, RANK and LOCAL_RANK must be integers"):
        World.from_env({"WORLD_SIZE": "two"})
