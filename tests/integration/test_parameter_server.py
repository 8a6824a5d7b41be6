"""Parameter-server training under torchrun (rank 0 serves, ranks 1..2 train over torch.distributed.rpc):
synchronous mode makes the same updates as one process, asynchronous mode converges within its staleness
bound, the result exports and publishes like any other, and bad worlds or a dying trainer end with a
clear error instead of a hang.

To keep the suite short, one torchrun launch serves three tests: its recipe's teacher section runs two
finetune steps on the tiny BERT, a synchronous one (compared with the same recipe in one process) and an
asynchronous one (whose classifier becomes the teacher that the variant exports and publishes). The
same recipe under DDP is the AllReduce reference of the plain-SGD comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from build_models.errors import BuildError
from build_models.training.distributed import World
from build_models.training.strategy import resolve_strategy
from service.manifest import load_verified

from test_distributed import dropout_free_source, write_recipe  # noqa: F401 - a fixture, reused

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
# Plain SGD, no warm-up: a run is compared update for update. lr 0.1 moves the weights well past the
# tolerances below and makes the cross-entropy fall within 24 steps.
FINETUNE = {"epochs": 1, "batch_size": 8, "max_seq_len": 32, "learning_rate": 0.1, "warmup_ratio": 0.0,
            "optimizer": "sgd", "checkpoint_every": 100, "progress": False, "strategy": "parameter_server"}
SYNC = {**FINETUNE, "samples": 96, "parameter_server_mode": "sync"}  # 12 steps
# Staleness bound 0 with two trainers computing at once: a push that lost the race is refused.
ASYNC = {**FINETUNE, "samples": 192, "seed": 1, "parameter_server_mode": "async", "max_staleness": 0}  # 24 steps
# Prints every rank's outcome after parameter-server training, so the test can see that they agree.
LAUNCHER = f"""\
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
from build_models.training import parameter_server
fit = parameter_server.ParameterServer.fit
def reporting_fit(self, session):
    fit(self, session)
    line = "OUTCOME " + json.dumps({{"rank": self.world.rank, "losses": session.outcome.losses,
                                     "extra": session.outcome.details}}) + "\\n"
    # One write() per line: torchrun runs the ranks unbuffered (python -u) on one shared pipe, where
    # print's separate writes of text and newline interleave; a single write under 4 KiB does not.
    assert len(line) < 4096
    os.write(1, line.encode())
parameter_server.ParameterServer.fit = reporting_fit
from build_models.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def builds(dropout_free_source, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The two-finetune recipe built once in one process and once under torchrun with 3 processes."""
    tmp = tmp_path_factory.mktemp("ps")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "family": "tiny", "source": {"path": str(dropout_free_source)}, "task": "classification",
        "max_seq_len": 64, "teacher": [{"finetune": SYNC}, {"finetune": ASYNC}],
        "evaluation": {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1},
        "gates": {"downstream_retention": None, "mean_cosine": None, "agreement": None},
        "variants": [{"name": "tiny-cls", "steps": [{"export_onnx": {}}]}],
    }))
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    single = run([sys.executable, "-m", "build_models.cli", "build", str(recipe), "--store", str(tmp / "one"),
                  "--strategy", "single"])
    assert single.returncode == 0, single.stderr[-3000:]
    ps = run([*TORCHRUN, str(launcher), "build", str(recipe), "--store", str(tmp / "ps"), "--dist-timeout", "60"])
    assert ps.returncode == 0, ps.stderr[-3000:]
    outcomes = [json.loads(line.split(" ", 1)[1]) for line in ps.stdout.splitlines() if line.startswith("OUTCOME ")]
    return tmp / "one", tmp / "ps", outcomes, recipe


def test_ddp_with_plain_sgd_trains_the_same_weights_as_one_process(builds):
    """The AllReduce reference under the same plain-SGD comparison (test_distributed.py checks AdamW)."""
    one, _, _, recipe = builds
    ddp_store = recipe.parent / "ddp"
    ddp = run([*TORCHRUN[:-1], "2", "-m", "build_models.cli", "build", str(recipe), "--store", str(ddp_store),
               "--strategy", "ddp", "--dist-timeout", "60"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = checkpoint(one, SYNC), checkpoint(ddp_store, SYNC)
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert finetune_details(ddp_store)[0]["strategy"] == "ddp"


def checkpoint(store: Path, cfg: dict) -> dict:
    """The finetune checkpoint with ``cfg``'s number of steps (the two finetunes differ in samples)."""
    steps = cfg["samples"] // cfg["batch_size"]
    found = [torch.load(p, weights_only=True) for p in (store / ".checkpoints").glob("finetune-*.pt")]
    (state,) = [s for s in found if s["step"] == steps]
    return state


def finetune_details(store: Path) -> list[dict]:
    manifest = load_verified(store / "tiny-cls" / "1")
    return [s.details for s in manifest.lineage.steps if s.name == "finetune"]


def test_sync_parameter_server_trains_the_same_weights_as_one_process(builds):
    one, ps, _, _ = builds
    a, b = checkpoint(one, SYNC), checkpoint(ps, SYNC)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        # Same global batch, the two trainers' half-batch gradients averaged on the server: the same 12
        # SGD updates as one process, up to float summation order.
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(b["losses"], a["losses"], rtol=1e-4, atol=1e-6)
    assert a["losses"][-1] < a["losses"][0]  # it trained: the weights moved

    sync, _ = finetune_details(ps)
    assert sync["strategy"] == "parameter_server" and sync["world_size"] == 3 and sync["mode"] == "sync"
    assert sync["rows_per_rank"] == 4 and sync["trainers"] == 2  # each trainer: half of every batch of 8
    assert sync["staleness_max_applied"] == 0 and sync["pushes_refused"] == 0 and sync["updates"] == 12
    # Per step each trainer fetches every parameter and pushes a gradient of each: fp32, 4 bytes.
    assert sync["bytes_per_step"] == 2 * 2 * 4 * sync["params"]


def test_async_parameter_server_converges_within_its_staleness_bound(builds):
    _, ps, _, _ = builds
    _, asynchronous = finetune_details(ps)
    assert asynchronous["mode"] == "async" and asynchronous["max_staleness"] == 0
    assert asynchronous["staleness_max_applied"] <= asynchronous["max_staleness"]
    assert asynchronous["steps"] == 24 and asynchronous["updates"] == 24 * 2  # one update per trainer's shard
    assert asynchronous["loss_last"] < asynchronous["loss_first"] - 0.1  # from about 2.0 (ln 8 classes)
    # Refused pushes cost their fetch and push too.
    pushes = asynchronous["updates"] + asynchronous["pushes_refused"]
    assert asynchronous["bytes_total"] == pushes * 2 * 4 * asynchronous["params"]


def test_every_rank_ends_with_the_servers_outcome_and_rank_0_publishes_once(builds):
    _, ps, outcomes, _ = builds
    assert sorted(o["rank"] for o in outcomes) == [0, 0, 1, 1, 2, 2]  # two finetunes, three ranks
    for first in (0, 1):
        mine = [o for o in outcomes if o["extra"]["mode"] == ("sync", "async")[first]]
        assert len(mine) == 3 and all(o == {**mine[0], "rank": o["rank"]} for o in mine)
    versions = sorted(p.name for p in (ps / "tiny-cls").iterdir() if not p.name.startswith("."))
    assert versions == ["1"]
    manifest = load_verified(ps / "tiny-cls" / "1")  # every file matches its sha256
    assert manifest.format == "onnx" and (ps / "tiny-cls" / "1" / "model.onnx").is_file()


def test_a_trainer_that_dies_stops_every_rank_with_an_error(dropout_free_source, tmp_path):  # noqa: F811
    recipe = write_recipe(tmp_path / "recipe.yaml", dropout_free_source, optimizer="sgd",
                          strategy="parameter_server")
    launcher = tmp_path / "die.py"
    launcher.write_text(f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\n"
                        "from build_models.training import loop\nfrom build_models.cli import main\n"
                        "if os.environ['RANK'] == '1':\n"
                        "    loop.after_step = lambda step: os._exit(3) if step == 2 else None\n"
                        "sys.exit(main(sys.argv[1:]))\n")
    began = time.monotonic()
    done = run([*TORCHRUN, str(launcher), "build", str(recipe), "--store", str(tmp_path / "store"),
                "--dist-timeout", "20"], timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert time.monotonic() - began < 200
    # torchrun names the rank that died; the survivors say why they stop.
    assert "exitcode  : 3" in out and "rank      : 1" in out, out[-3000:]
    # Which message a survivor gives depends on where the launcher's SIGTERM finds it: inside
    # parameter-server training, or outside it (the CLI's own handler); either says why it stopped.
    survivors = {0: ("error: rank 0: stopped by the launcher", "error: parameter server: no word from trainer rank(s) [1]",
                     "[rank 0] stopped: the launcher ended this rank"),
                 2: ("error: rank 2: stopped by the launcher", "error: rank 2: the parameter server stopped",
                     "error: rank 2: lost the parameter server", "[rank 2] stopped: the launcher ended this rank")}
    for rank, messages in survivors.items():
        assert any(m in out for m in messages), f"rank {rank} said nothing:\n{out[-3000:]}"
    assert not (tmp_path / "store" / "student").exists()


def test_parameter_server_worlds_are_checked_before_training():
    with pytest.raises(BuildError, match="'parameter_server' needs a server and at least one trainer"):
        resolve_strategy("parameter_server", World(rank=0, size=1), 8, "distill")
    three = World(rank=0, size=3, backend=None)  # what each rank of a torchrun world of 3 sees
    with pytest.raises(BuildError, match="batch_size 9 does not split evenly over the 2 parameter-server trainers"):
        resolve_strategy("parameter_server", three, 9, "finetune")
    assert resolve_strategy("parameter_server", three, 8, "distill").name == "parameter_server"
