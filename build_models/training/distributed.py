"""The process world a build runs in: one process, or the ranks torchrun started.

``torchrun --nproc_per_node N -m build_models.cli build RECIPE`` sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous address in each process's environment; ``World.from_env`` joins that group (gloo on CPU,
nccl when the training runs on CUDA) with a timeout, so a rank that never arrives ends the build with
an error instead of a hang. Before any heavy work every rank proves it runs the same recipe.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from build_models.errors import BuildError


# What torch.distributed's backends (gloo, nccl, TensorPipe RPC) say when the other side is gone.
_PEER_FAILURE_MARKS = ("connection", "timed out", "timeout", "broken pipe", "gloo", "nccl", "tensorpipe", "eof",
                       "peer", "rpc")


def lost_a_peer(exc: BaseException) -> bool:
    """Whether an error from a collective, an RPC or a pipeline step means another rank went away or
    stopped answering (gloo reports that only in a plain RuntimeError's text)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(mark in text for mark in _PEER_FAILURE_MARKS)


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (torch's are often a page long), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (one process)
    timeout_s: float = 1800.0  # how long a rank waits for the others (--dist-timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, timeout_s: float = 1800.0) -> "World":
        """The torchrun world when WORLD_SIZE > 1 is set, else a world of one (no process group)."""
        env = os.environ if environ is None else environ
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise BuildError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
        if size <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise BuildError(f"rank {rank}: cannot join the torchrun group of {size} "
                             f"({str(exc).splitlines()[0]})") from None
        return cls(rank=rank, size=size, local_rank=local_rank, backend=backend, timeout_s=timeout_s)

    @property
    def device(self):
        import torch

        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else torch.device("cpu")

    def agree(self, what: str, payload: Any) -> None:
        """Raise on every rank unless every rank passed the same ``payload`` (hashed, JSON-able)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
        digests: list[str | None] = [None] * self.size
        dist.all_gather_object(digests, digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise BuildError(f"ranks disagree on the {what}: rank(s) {odd} differ from rank 0 "
                             f"({digests[odd[0]][:12]} vs {digests[0][:12]}); start every rank with the same "
                             f"recipe file, options and package versions")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        box: list = [None] * self.size
        dist.all_gather_object(box, obj)
        return box

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (every rank gets it)."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.backend = None
