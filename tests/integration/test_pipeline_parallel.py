"""Pipeline-parallel training under torchrun: two CPU processes (gloo), one stage each, train the same
model as one process with the same global batch (plain SGD, so update for update), rank 0 publishes
the whole trained model, and bad settings or a dying rank end the run with a clear error."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoTokenizer, BertModel

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.evaluate import evaluation_texts
from build_models.modeling import load_reference
from build_models.recipe import DistillConfig, FinetuneConfig, parse_recipe
from build_models.steps import distill, finetune
from build_models.training.data import training_corpus
from build_models.training.distributed import World
from build_models.training.loop import global_rows
from build_models.training.pipeline_parallel import EncoderStage, split_layers
from build_models.training.strategy import resolve_strategy
from service.manifest import load_verified
from tests.helpers import tiny_config, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
# 4-layer teacher -> 2-layer student (teacher layers 1 and 3): one student layer per stage; with the
# teacher's large random weights the loss starts far from zero (1.5 -> 0.4 in 6 steps), so the
# parameters move far beyond the tolerance and the gradient norm is clipped (globally, over stages).
DISTILL = {"num_layers": 2, "samples": 48, "batch_size": 8, "max_seq_len": 32, "learning_rate": 0.5,
           "warmup_ratio": 0.0, "hidden_loss_weight": 0.5, "checkpoint_every": 4, "progress": False,
           "optimizer": "sgd", "micro_batches": 4}
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def four_layer_source(tiny_embedding_dir, tmp_path_factory) -> Path:
    """The tiny embedding checkpoint with 4 layers of large random weights (far from identity maps) and
    no dropout (random masks would differ between one process and a pipeline)."""
    path = tmp_path_factory.mktemp("four-layers") / "model"
    shutil.copytree(tiny_embedding_dir, path)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
    config.num_hidden_layers = 4
    torch.manual_seed(3)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def write_recipe(path: Path, source: Path, **distill_cfg) -> Path:
    student = {"name": "student", "steps": [{"distill": {**DISTILL, **distill_cfg}}, {"export_onnx": {}}]}
    path.write_text(yaml.safe_dump(tiny_recipe(source, [student])))
    return path


def test_two_stages_train_the_same_student_as_one_process(four_layer_source, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", four_layer_source, strategy="pipeline")
    store = tmp_path / "store"
    done = subprocess.run([*TORCHRUN, "-m", "build_models.cli", "build", str(recipe), "--store", str(store),
                           "--dist-timeout", "60"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # The same step in this process, strategy single, from the same reference.
    tokenizer = AutoTokenizer.from_pretrained(four_layer_source)
    reference = load_reference(four_layer_source, "embedding", "mean", True)
    # The build leaves the evaluation's texts out of training; so does this run.
    excluded = evaluation_texts(parse_recipe(yaml.safe_load(recipe.read_text())).evaluation)
    ctx = BuildContext(source=None, task="embedding", tokenizer=tokenizer, work_dir=tmp_path, max_seq_len=64,
                       provider="cpu", sample_texts=[], reference=reference, evaluation_texts=excluded)
    cfg = DistillConfig(**{**DISTILL, "strategy": "single"})
    texts = training_corpus("distill", cfg, excluded)[0]
    art, single = distill.run(cfg, Artifact(kind="torch", module=copy.deepcopy(reference)), ctx)
    one = art.module.state_dict()

    (checkpoint,) = (store / ".checkpoints").glob("distill-*.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 6
    two = saved["model"]  # rank 0's checkpoint: the whole student, both stages' parameters
    assert one.keys() == two.keys()
    for name in one:
        # Same global batch, micro-batch gradients averaged: the same SGD updates up to float
        # summation order (max difference seen: 1.2e-7).
        torch.testing.assert_close(two[name], one[name], rtol=RTOL, atol=ATOL, msg=name)
    student = distill.make_student(reference, [1, 3])
    task = distill.DistillTask(cfg, reference, [1, 3], tokenizer, texts, None, "cpu")
    task.loss_fn(distill.StudentForward(student, True), global_rows(0, 48, 8, 0)).backward()
    # Above norm 1 the update is clipped: the stages must agree on the global norm to match.
    assert torch.nn.utils.get_total_norm([p.grad for p in student.parameters() if p.grad is not None]) > 1.5
    start = student.state_dict()
    for name in ("encoder.encoder.layer.0.attention.self.query.weight", "encoder.encoder.layer.1.output.dense.weight"):
        assert (one[name] - start[name]).abs().max() > 100 * ATOL, f"{name} barely moved: the check would prove nothing"

    versions = sorted(p.name for p in (store / "student").iterdir() if not p.name.startswith("."))
    assert versions == ["1"]  # rank 0 alone exported and published the pipeline-trained student
    details = {s.name: s.details for s in load_verified(store / "student" / "1").lineage.steps}["distill"]
    assert details["strategy"] == "pipeline" and details["world_size"] == 2 and details["rows_per_rank"] == 8
    assert details["pipeline_schedule"] == "gpipe" and details["micro_batches"] == 4
    assert details["stage_layers"] == [[0], [1]]
    assert abs(details["loss_last"] - single["loss_last"]) < 1e-5

    # Bytes between the stages: per micro-batch, stage 0 sends its layer's hidden states [2, T, 32]
    # (the last stage needs them for the hidden-state loss) and gets their gradient back.
    lengths = [tokenizer([texts[i] for i in global_rows(s, 48, 8, 0)], padding=True, truncation=True,
                         max_length=32, return_tensors="pt")["input_ids"].shape[1] for s in range(6)]
    forward = sum(8 * t * 32 * 4 for t in lengths) / 6
    assert details["bytes_forward_per_step"] == details["bytes_backward_per_step"] == round(forward)
    assert details["bytes_per_step"] == round(2 * forward)
    stage_params = sum(p.numel() * 4 for p in EncoderStage(art.module, range(0, 1), True, False, True).parameters())
    assert details["gather_bytes"] >= stage_params  # the final sharing of the parameters, counted apart


CLASSIFIER_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import copy, torch
from torch import nn
from transformers import AutoTokenizer
from build_models.modeling import load_reference
from build_models.recipe import DistillConfig
from build_models.steps.distill import DistillTask, StudentForward, make_student
from build_models.training.distributed import World
from pathlib import Path
from build_models.training import loop
from build_models.training.pipeline_parallel import PipelineParallel
from build_models.training.strategy import Single

world = World.from_env(timeout_s=60)
teacher = load_reference({source!r}, "classification", None, False)
for m in teacher.modules():
    if isinstance(m, nn.Dropout):
        m.p = 0.0
tokenizer = AutoTokenizer.from_pretrained({source!r})
texts = [f"text number {{i}} about " + "oil wheat shares rates "[: 5 * (i % 5) + 3] for i in range(32)]
labels = [i % 8 for i in range(32)]
cfg = DistillConfig(layers=[0, 1], batch_size=8, learning_rate=0.5, warmup_ratio=0.0, optimizer="sgd",
                    progress=False, max_seq_len=16, micro_batches=4, pipeline_schedule="1f1b", ce_weight=0.5)

def run(strategy, w, cfg=cfg, checkpoint=None):
    torch.manual_seed(0)
    student = make_student(teacher, [0, 1])
    with torch.no_grad():  # start away from the teacher, so the KL term has gradients too
        for p in student.classifier.bert.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    task = DistillTask(cfg, teacher, [0, 1], tokenizer, texts, labels, w.device)
    outcome = loop.train("distill", cfg, student, StudentForward(student, False), len(texts), task, w,
                         strategy, checkpoint)
    return student, outcome

piped, outcome = run(PipelineParallel(world, 4, "1f1b"), world)
if world.is_main:
    alone, single = run(Single(World()), World())
    worst = max(float((a - b).abs().max()) for a, b in zip(piped.state_dict().values(), alone.state_dict().values()))
    start = make_student(teacher, [0, 1]).state_dict()["classifier.classifier.weight"]
    moved = float((alone.state_dict()["classifier.classifier.weight"] - start).abs().max())
    ok = all(torch.allclose(a, b, rtol={rtol}, atol={atol})
             for a, b in zip(piped.state_dict().values(), alone.state_dict().values()))
    print(f"RESULT ok={{ok}} worst={{worst:.3g}} moved={{moved:.3g}} loss={{outcome.losses[-1]:.6f}} "
          f"single={{single.losses[-1]:.6f}} stages={{outcome.details['stage_layers']}}", flush=True)

# Resume: AdamW (optimizer state on both stages), checkpoint every 2 steps, stopped after step 2 on
# every rank, started again: the same weights as a run that was never stopped.
class Stop(Exception):
    pass

def stop_after_2(step):
    if step == 2:
        raise Stop

adam = cfg.model_copy(update={{"optimizer": "adamw", "learning_rate": 1e-3, "checkpoint_every": 2}})
checkpoint = Path({checkpoint!r})
loop.after_step = stop_after_2
try:
    run(PipelineParallel(world, 4, "1f1b"), world, adam, checkpoint)
except Stop:
    pass
loop.after_step = lambda step: None
resumed, again = run(PipelineParallel(world, 4, "1f1b"), world, adam, checkpoint)
straight, _ = run(PipelineParallel(world, 4, "1f1b"), world, adam, None)
if world.is_main:
    states = len(torch.load(checkpoint, weights_only=True)["optimizer"]["state"])
    same = all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    print(f"RESUME at={{again.resumed_at_step}} same={{same}} states={{states}} "
          f"params={{sum(1 for p in resumed.parameters())}}", flush=True)
world.close()
"""


def test_classifier_pipeline_with_1f1b_matches_one_process(tiny_classifier_dir, tmp_path):
    """Classifier distillation (KL on softened logits + cross-entropy on labels), the BERT pooler and
    head on the last stage, the 1F1B schedule: the same weights as one process. Then an interrupted
    AdamW run resumes from rank 0's checkpoint to exactly the weights of an uninterrupted one."""
    script = tmp_path / "classifier.py"
    script.write_text(CLASSIFIER_SCRIPT.format(root=str(ROOT), source=str(tiny_classifier_dir), rtol=RTOL, atol=ATOL,
                                               checkpoint=str(tmp_path / "ckpt" / "distill.pt")))
    done = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = re.search(r"RESULT ok=(\w+) worst=(\S+) moved=(\S+) loss=(\S+) single=(\S+) stages=(.*)", done.stdout)
    assert result, done.stdout[-2000:] + done.stderr[-2000:]
    ok, worst, moved, loss, single, stages = result.groups()
    assert ok == "True", f"largest difference {worst}"
    assert float(moved) > 100 * ATOL
    assert abs(float(loss) - float(single)) < 1e-5
    assert stages == "[[0], [1]]"
    resumed = re.search(r"RESUME at=(\d+) same=(\w+) states=(\d+) params=(\d+)", done.stdout)
    assert resumed, done.stdout[-2000:]
    at, same, states, params = resumed.groups()
    assert at == "2" and same == "True"
    assert states == params  # rank 0's checkpoint holds the AdamW state of both stages' parameters


def test_stages_compute_what_the_whole_model_computes(tiny_embedding_dir, tiny_classifier_dir):
    """Without processes: the stage modules chained in one process give the unsplit model's outputs
    (embedding with every layer's hidden states, logits), for 2 stages of a 2-layer model."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    batch = tokenizer(["Oil prices rose sharply on Monday.", "ok", "Wheat exports fell for a third month."],
                      padding=True, return_tensors="pt")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    cases = [(load_reference(tiny_embedding_dir, "embedding", "mean", True), True),
             (load_reference(tiny_embedding_dir, "embedding", "cls", False), False),
             (load_reference(tiny_classifier_dir, "classification", None, False), False)]
    for model, carry in cases:
        stages = [EncoderStage(model, r, i == 0, i == 1, carry) for i, r in enumerate(split_layers(2, 2))]
        # Every parameter trains on exactly one stage (the classifier's pooler and head on the last).
        owned = [id(p) for s in stages for p in s.parameters()]
        assert sorted(owned) == sorted(id(p) for p in model.parameters())
        with torch.no_grad():
            out = stages[1](*stages[0](ids, types, attention_mask=mask), attention_mask=mask)
            whole = distill.StudentForward(model, carry)(ids, mask, types)
        out, whole = (out, whole) if carry else ((out,), (whole,))
        assert len(out) == len(whole) == (3 if carry else 1)
        for a, b in zip(out, whole):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_micro_batch_losses_average_to_the_batch_gradient(tiny_embedding_dir, tiny_classifier_dir):
    """Each task's loss is a per-example mean: the mean of 4 equal micro-batches' gradients (what the
    schedule computes with scale_grads) is the whole batch's gradient."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    texts = [f"sentence {i} on crude oil and grain shipments " * (1 + i % 3) for i in range(8)]
    rows = list(range(8))
    embedding = load_reference(tiny_embedding_dir, "embedding", "mean", True)
    classifier = load_reference(tiny_classifier_dir, "classification", None, False)
    for model in (embedding, classifier):
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    student_e, student_c = distill.make_student(embedding, [1]), distill.make_student(classifier, [1])
    tasks = [
        (distill.DistillTask(DistillConfig(num_layers=1, hidden_loss_weight=0.5, loss="mse"), embedding, [1],
                             tokenizer, texts, None, "cpu"), student_e),
        (distill.DistillTask(DistillConfig(num_layers=1, ce_weight=0.5), classifier, [1], tokenizer, texts,
                             [i % 8 for i in rows], "cpu"), student_c),
        (finetune.FinetuneTask(FinetuneConfig(), tokenizer, texts, [i % 8 for i in rows], "cpu"), student_c),
    ]
    for task, student in tasks:
        forward = distill.StudentForward(student, task.carry_hidden)
        params = [p for p in student.parameters() if p.requires_grad]
        batch = task.inputs(rows)
        target = task.target(rows, batch)

        def run(sl):
            out = forward(batch["input_ids"][sl], batch["attention_mask"][sl], batch["token_type_ids"][sl])
            return task.loss(out, target[sl])

        whole = torch.autograd.grad(run(slice(0, 8)), params, allow_unused=True)
        parts = [torch.autograd.grad(run(slice(i, i + 2)), params, allow_unused=True) for i in range(0, 8, 2)]
        for j, g in enumerate(whole):
            if g is None:
                continue
            mean = sum(part[j] for part in parts) / 4
            torch.testing.assert_close(mean, g, rtol=1e-4, atol=1e-6)


def test_pipeline_settings_fail_before_training():
    two = World(rank=0, size=2, backend=None)  # what each rank of a torchrun world of 2 sees
    assert resolve_strategy("pipeline", two, 8, "distill", layers=2, micro_batches=4).name == "pipeline"
    with pytest.raises(BuildError, match="a pipeline of 3 stages needs at least 3 transformer layers .* the model "
                                         "has 2; use at most 2 processes"):
        resolve_strategy("pipeline", World(rank=0, size=3, backend=None), 8, "distill", layers=2)
    with pytest.raises(BuildError, match="batch_size 8 does not split into 3 equal micro-batches"):
        resolve_strategy("pipeline", two, 8, "distill", layers=2, micro_batches=3)
    with pytest.raises(BuildError, match="1f1b needs at least one micro-batch per stage"):
        resolve_strategy("pipeline", two, 8, "distill", layers=2, micro_batches=1, schedule="1f1b")
    with pytest.raises(BuildError, match="'pipeline' needs one process per stage, at least 2"):
        resolve_strategy("pipeline", World(), 8, "distill", layers=2)
    with pytest.raises(ValueError, match="micro_batches"):
        DistillConfig(num_layers=1, micro_batches=0)


def test_the_steps_check_their_depth_before_training(tiny_embedding_dir, tmp_path):
    """distill checks the student's depth, finetune the source's, before any training (each rank of
    a torchrun world of 2 or 3 sees the same World and stops with the same error)."""
    from build_models.sources import ResolvedSource

    reference = load_reference(tiny_embedding_dir, "embedding", "mean", True)
    ctx = BuildContext(source=None, task="embedding", tokenizer=AutoTokenizer.from_pretrained(tiny_embedding_dir),
                       work_dir=tmp_path, max_seq_len=64, provider="cpu", sample_texts=[], reference=reference,
                       world=World(rank=0, size=2, backend=None))
    cfg = DistillConfig(**{**DISTILL, "num_layers": 1, "strategy": "pipeline"})
    with pytest.raises(BuildError, match="distill: a pipeline of 2 stages needs at least 2 transformer layers"):
        distill.run(cfg, Artifact(kind="torch", module=reference), ctx)
    ctx.world = World(rank=0, size=3, backend=None)
    ctx.source = ResolvedSource(path=tiny_embedding_dir, description={}, model_type="bert",
                                config=json.loads((tiny_embedding_dir / "config.json").read_text()))
    with pytest.raises(BuildError, match="finetune: a pipeline of 3 stages needs at least 3 transformer layers"):
        finetune.run(FinetuneConfig(strategy="pipeline", batch_size=8, micro_batches=4), Artifact(kind="torch"), ctx)


def dying_rank_launcher(tmp_path: Path, recipe: Path) -> Path:
    """A build whose rank 1 exits (code 3) right after its second optimizer step."""
    launcher = tmp_path / "dies.py"
    launcher.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                        "from build_models.training import loop\nfrom build_models.cli import main\n"
                        "def after_step(step):\n"
                        "    if os.environ['RANK'] == '1' and step == 2:\n        os._exit(3)\n"
                        "loop.after_step = after_step\n"
                        f"sys.exit(main(['build', {str(recipe)!r}, '--store', {str(tmp_path / 'store')!r}, "
                        "'--dist-timeout', '20']))\n")
    return launcher


def test_a_rank_that_dies_mid_run_ends_the_build(four_layer_source, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", four_layer_source, strategy="pipeline")
    # A slow agent (it checks its workers every 5 s) lets the survivor find out by itself, as on
    # another machine: its next message to the dead rank fails at once.
    done = subprocess.run([*TORCHRUN, "--monitor-interval", "5", str(dying_rank_launcher(tmp_path, recipe))],
                          env=ENV, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert re.search(r"error: pipeline: stage 0 of 2 lost its peers at step 3 \(.*\); another rank died", out), \
        out[-3000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*3", out), out[-3000:]  # torchrun's summary
    assert not (tmp_path / "store" / "student").exists()
