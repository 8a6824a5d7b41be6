"""How a training step spreads its work over the world: one interface, one class per strategy.

A strategy's ``fit(session)`` walks the training steps of a ``TrainSession`` (``loop.py``): it decides
which rank computes which rows of each global batch, how their gradients meet, and who applies the
update; the data order, optimiser, schedule, NaN guard and checkpoints are the session's and the same
for every strategy, so every strategy trains the same kind of model from the same data.
single and ddp live here; parameter_server (one server rank holding the parameters and optimiser,
trainer ranks over torch.distributed.rpc) in ``parameter_server.py``.
"""

from __future__ import annotations

from typing import get_args

from torch import nn

from build_models.errors import BuildError
from build_models.recipe import Strategy
from build_models.training.distributed import World

STRATEGIES = get_args(Strategy)
# Settings that decide how a training step is spread, never what it computes: left out of checkpoint
# keys, so a run may resume another strategy's checkpoint.
NOT_IN_RESULT = {"progress", "strategy", "micro_batches", "pipeline_schedule", "parameter_server_mode",
                 "max_staleness"}


class Single:
    """The whole global batch in this one process."""

    name = "single"

    def __init__(self, world: World):
        self.world = world

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def shard(self, rows: list[int]) -> list[int]:
        return rows

    def fit(self, session) -> None:
        """Every step: this rank's rows of the global batch, forward and backward through ``wrap``
        (which combines the ranks' gradients), then one update."""
        wrapped = self.wrap(session.forward)
        for step in range(session.outcome.resumed_at_step, session.outcome.total_steps):
            rows = self.shard(session.rows(step))
            session.outcome.rows_per_rank = len(rows)
            loss = session.loss_fn(wrapped, rows)
            value = self.world.mean(float(loss.item()))
            session.check(value, step)
            session.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            session.apply()
            session.finish_step(step, value)


class DataParallel(Single):
    """DDP: every rank computes an equal slice of the global batch; backward all-reduces (averages)
    the gradients, so each rank applies the same update as one process with the whole batch."""

    name = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if not self.world.distributed:
            return module  # a world of one: DDP would only add copies
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        device_ids = [self.world.local_rank] if self.world.backend == "nccl" else None
        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts identical.
        ddp = DistributedDataParallel(module, device_ids=device_ids)

        def counting_allreduce(state, bucket):
            # DDP's own all-reduce, with the bytes of each gradient bucket counted on the way.
            buffer = bucket.buffer()
            self.payload_bytes += buffer.numel() * buffer.element_size()
            return allreduce_hook(state, bucket)

        self.payload_bytes = 0
        ddp.register_comm_hook(None, counting_allreduce)
        return ddp

    def fit(self, session) -> None:
        super().fit(session)
        steps = session.outcome.total_steps - session.outcome.resumed_at_step
        if self.world.distributed and steps:
            # A ring all-reduce of S bytes sends 2(N-1)/N x S from every rank: 2(N-1) x S over the
            # network per step, comparable with the parameter server's fetches plus pushes.
            per_rank = self.payload_bytes / steps
            session.outcome.details.update(allreduce_bytes_per_rank=int(per_rank),
                                         bytes_per_step=int(per_rank * 2 * (self.world.size - 1)))

    def shard(self, rows: list[int]) -> list[int]:
        per_rank = len(rows) // self.world.size
        return rows[self.world.rank * per_rank:(self.world.rank + 1) * per_rank]


def resolve_strategy(name: str, world: World, batch_size: int, step: str, *, layers: int | None = None,
                     micro_batches: int = 1, schedule: str = "gpipe"):
    """The strategy object for a step, checked against the world before any training starts.

    ``layers``: the trained model's transformer layers (a pipeline puts at least one on each stage);
    ``micro_batches`` and ``schedule``: the pipeline's (recipe fields of the same names)."""
    if name not in STRATEGIES:
        raise BuildError(f"{step}: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if name == "parameter_server":
        from build_models.training.parameter_server import ParameterServer

        return ParameterServer.for_world(world, batch_size, step)
    if name == "pipeline":
        from build_models.training.pipeline_parallel import PipelineParallel

        PipelineParallel.check(world, batch_size, step, layers, micro_batches, schedule)
        return PipelineParallel(world, micro_batches, schedule)
    if name == "auto":
        name = "ddp" if world.size > 1 else "single"
    if name == "single" and world.size > 1:
        raise BuildError(f"{step}: strategy 'single' cannot use the {world.size} processes torchrun started; "
                         f"launch without torchrun or use strategy 'ddp'")
    if name == "ddp" and batch_size % world.size:
        raise BuildError(f"{step}: batch_size {batch_size} does not split evenly over {world.size} ranks; "
                         f"use a multiple of {world.size} so every rank computes the same share")
    return DataParallel(world) if name == "ddp" else Single(world)
