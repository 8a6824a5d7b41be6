"""The optimisation loop that distill and finetune share: batches, AdamW with linear warm-up,
gradient clipping, the NaN guard, a progress bar, resumable checkpoints, and the strategy seam.

Every rank walks the same global batch order (a seeded shuffle per epoch); the strategy picks this
rank's rows of each batch and combines the gradients. Only rank 0 shows progress and writes
checkpoints; on resume rank 0 reads the checkpoint and sends it to the others, so a multi-node run
needs no shared disk.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from build_models.errors import BuildError
from build_models.training.distributed import World

# (module to call, this rank's row indices) -> the mean loss over those rows
LossFn = Callable[[nn.Module, list[int]], torch.Tensor]
MAX_GRAD_NORM = 1.0


class StagedTask:
    """A training step's loss cut where a pipeline needs to cut it: the model's inputs, the target
    and the loss of (model output, target), each usable on its own.

    ``inputs`` runs on every rank (each tokenizes the global batch itself, so shapes are known
    everywhere without messages); ``target`` only where the loss is computed (a pipeline's last
    stage); ``loss`` must be a per-example mean over the rows of one (micro-)batch, so that equal
    micro-batches average to the whole batch's loss and gradient. ``loss_fn`` puts the three together
    for the strategies that run the whole model in one process (single, ddp)."""

    # The loss needs every student layer's hidden states: the model (and a pipeline's stages) then
    # returns (output, *hidden states of each layer) instead of output alone.
    carry_hidden: bool = False

    def inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The tokenized rows on the training device: input_ids, attention_mask[, token_type_ids]."""
        raise NotImplementedError

    def target(self, rows: list[int], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One tensor whose first dimension is the rows (teacher outputs, labels, packed together):
        a pipeline schedule splits it into micro-batches along that dimension."""
        raise NotImplementedError

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """The per-example mean loss of the model's output (a tensor, or a tuple when carry_hidden)."""
        raise NotImplementedError

    def loss_fn(self, forward: nn.Module, rows: list[int]) -> torch.Tensor:
        batch = self.inputs(rows)
        output = forward(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return self.loss(output, self.target(rows, batch))


@dataclass
class TrainOutcome:
    total_steps: int
    resumed_at_step: int
    losses: list[float] = field(default_factory=list)  # per step, averaged over the ranks
    seconds: float = 0.0
    strategy: str = "single"
    world_size: int = 1
    rows_per_rank: int = 0  # examples of each global batch this rank computed
    details: dict = field(default_factory=dict)  # what a strategy measured (mode, bytes communicated, ...)

    def summary(self) -> dict:
        window = max(1, min(10, len(self.losses) // 4))
        return {"steps": self.total_steps, "resumed_at_step": self.resumed_at_step,
                "loss_first": round(sum(self.losses[:window]) / window, 6),
                "loss_last": round(sum(self.losses[-window:]) / window, 6),
                "seconds": round(self.seconds, 1), "strategy": self.strategy, "world_size": self.world_size,
                "rows_per_rank": self.rows_per_rank, **self.details}


def global_rows(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: a fresh seeded shuffle each epoch, the tail dropped."""
    steps_per_epoch = n_examples // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = list(range(n_examples))
    random.Random(seed + epoch).shuffle(order)
    return order[index * batch_size:(index + 1) * batch_size]


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW for real builds; plain SGD (no momentum, no decay) where runs are compared update for
    update, as the strategy equivalence tests do."""
    if kind == "sgd":
        return torch.optim.SGD(groups)
    return torch.optim.AdamW(groups, weight_decay=0.01)


def after_step(step: int) -> None:
    """Called after every optimizer step; tests replace it to interrupt a run."""


def train(name: str, cfg, model: nn.Module, forward: nn.Module, n_examples: int, task: StagedTask,
          world: World, strategy, checkpoint: Path | None, fast_params: list[nn.Parameter] | None = None,
          fast_learning_rate: float | None = None) -> TrainOutcome:
    """Train ``model``'s parameters through ``forward`` (a module sharing them) for cfg.epochs.

    ``cfg`` carries epochs, batch_size, learning_rate, warmup_ratio, checkpoint_every, seed, progress.
    ``task`` is the step's loss, whole (``task.loss_fn``) and in parts for strategies that split the
    model (pipeline). ``fast_params`` (a new head, say) train at ``fast_learning_rate`` instead.
    """
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = n_examples // cfg.batch_size
    if steps_per_epoch < 1:
        raise BuildError(f"{name}: {n_examples} training examples; need at least one batch of {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    fast = {id(p) for p in fast_params or []} if fast_learning_rate else set()
    groups = [{"params": [p for p in params if id(p) not in fast], "lr": cfg.learning_rate}]
    if fast:
        groups.append({"params": [p for p in params if id(p) in fast], "lr": fast_learning_rate})
    optimizer = make_optimizer(cfg.optimizer, groups)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    outcome = TrainOutcome(total_steps=total, resumed_at_step=0, strategy=strategy.name, world_size=world.size)

    state = None
    if world.is_main and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")  # tensors and plain data only
    state = world.broadcast(state)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        outcome.resumed_at_step, outcome.losses = state["step"], list(state["losses"])

    session = TrainSession(name=name, cfg=cfg, model=model, forward=forward, n_examples=n_examples,
                           task=task, world=world, params=params, optimizer=optimizer,
                           scheduler=scheduler, outcome=outcome, checkpoint=checkpoint)
    began = time.perf_counter()
    model.train()
    session.bar = tqdm(total=total, initial=outcome.resumed_at_step, desc=name, unit="step",
                       disable=not (cfg.progress and world.is_main))
    try:
        strategy.fit(session)
    finally:
        session.bar.close()
    # Peak resident memory of every rank (the whole process: model, teacher, optimiser, traffic buffers).
    outcome.details["peak_rss_mb_per_rank"] = [round(mb, 1) for mb in world.gather(_peak_rss_mb())]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    outcome.seconds = time.perf_counter() - began
    return outcome


@dataclass
class TrainSession:
    """One training run as the strategies see it: the model and optimiser, the data order, and the
    bookkeeping every strategy shares (NaN guard, progress, checkpoints). A strategy's ``fit`` walks
    the steps from ``outcome.resumed_at_step`` and, per step, gets the global batch's gradient into
    the parameters' ``.grad`` however it spreads the work, then calls ``apply`` and ``finish_step``."""

    name: str
    cfg: object
    model: nn.Module
    forward: nn.Module
    n_examples: int
    task: StagedTask  # the step's loss: whole (``loss_fn``), or in parts for a pipeline
    world: World
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    outcome: TrainOutcome
    checkpoint: Path | None
    bar: object = None

    @property
    def loss_fn(self) -> LossFn:
        return self.task.loss_fn

    def rows(self, step: int) -> list[int]:
        return global_rows(step, self.n_examples, self.cfg.batch_size, self.cfg.seed)

    def check(self, value: float, step: int) -> None:
        """Stop on a diverged loss; every rank must pass the same ``value`` so all stop together."""
        if value != value or value in (float("inf"), float("-inf")):
            raise BuildError(f"{self.name}: the loss became {value} at step {step + 1}; lower learning_rate "
                             f"(now {self.cfg.learning_rate})")

    def apply(self, total_norm: torch.Tensor | None = None, schedule: bool = True) -> None:
        """One optimiser update from the gradients now in ``.grad`` (clipped to norm 1), then one
        learning-rate schedule step unless ``schedule`` is false (a strategy that makes several
        updates per global batch steps the schedule once per batch itself).

        ``total_norm``: the gradient norm over the whole model when this rank holds only some of its
        gradients (a pipeline stage); by default the norm of the gradients here."""
        if total_norm is None:
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        else:
            torch.nn.utils.clip_grads_with_norm_(self.params, MAX_GRAD_NORM, total_norm)
        self.optimizer.step()
        if schedule:
            self.scheduler.step()

    def checkpoints_after(self, step: int) -> bool:
        """Whether ``finish_step(step, ...)`` writes a checkpoint (on rank 0)."""
        done = step + 1
        return self.checkpoint is not None and (done % self.cfg.checkpoint_every == 0
                                                or done == self.outcome.total_steps)

    def finish_step(self, step: int, value: float) -> None:
        """Record the step's loss, show progress, checkpoint on rank 0, call ``after_step``."""
        self.outcome.losses.append(value)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if self.world.is_main and self.checkpoints_after(step):
            _save(self.checkpoint, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                    "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                                    "step": done, "losses": self.outcome.losses})
        after_step(done)


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def checkpoint_key(*parts) -> str:
    """A short digest of everything that decides a training result (configs, layers, weights)."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            for key, tensor in sorted(part.state_dict().items()):
                digest.update(key.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(str(float(tensor.float().sum())).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
