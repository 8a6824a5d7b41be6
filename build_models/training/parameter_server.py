"""Parameter-server training over torch.distributed.rpc (TensorPipe), launched by torchrun like DDP.

Rank 0 is the server: it alone holds the optimiser and learning-rate schedule, applies every update,
shows progress and writes the checkpoints, so after training its model holds the trained weights
(rank 0 is also the rank that evaluates and publishes). Ranks 1..N-1 are trainers: they hold no
optimiser state; for each piece of work they fetch the current parameters from the server (one flat
tensor), compute the gradient of the mean loss over their shard of a global batch (batch_size /
trainers rows of ``session.rows(step)``), and push that gradient and its loss back. Unlike DDP,
where every rank keeps a full copy and the ranks average gradients among themselves, all traffic
goes through the server: per trainer and shard, one parameter fetch and one gradient push.

Two modes (``parameter_server_mode``):
- sync: the server waits until every trainer has pushed its shard of global batch ``step``, averages
  the gradients (equal shards of a mean loss, so the average is the whole batch's gradient), and
  makes one update (``session.apply``: clip, optimiser, schedule); trainers wait for it before they
  fetch again. With the same data and plain SGD this is the update a single process makes, up to
  float summation order.
- async: the server applies each push as it arrives, one optimiser update per shard, on parameters
  that may have moved since the trainer fetched them. Staleness = the server's parameter version
  (updates applied so far) when a push arrives minus the version the trainer fetched. A push staler
  than ``max_staleness`` is refused and never touches the parameters; the trainer fetches again and
  recomputes the same shard, so every applied gradient is at most ``max_staleness`` updates old.
  Work is handed out in order as units (step, shard), and no unit is handed out more than
  ``trainers`` units ahead of the oldest unit not yet applied: a trainer whose pushes keep being
  refused soon finds the others waiting, its next push is fresh, and nobody starves.
  A "step" is still one global batch (so total_steps, the schedule, checkpoint_every and resume mean
  what they mean for the other strategies): step s is finished once all of its ``trainers`` shards
  have been applied; then the schedule steps once, its loss (the mean of its shards' losses) is
  recorded and its checkpoint written. Because trainers run ahead by at most ``trainers`` - 1 units,
  a checkpoint may already hold a few updates of the next step, which a resumed run applies again:
  asynchronous training is not reproducible update for update anyway.

Server state stays one copy: the parameters, the optimiser state, one gradient buffer (sync: the
first push of a step is the buffer, the rest are added into it) and one flat snapshot of the
parameters per version, shared by every fetch of that version. ``bytes_per_step`` in the step's
details counts the tensor payload that crossed the network (parameters fetched plus gradients
pushed, numel * element_size, over all trainers), divided by the global steps trained: in sync mode
exactly 2 x trainers x parameter bytes; refused async pushes add their fetch and push on top.

Failures end every rank with a message and never a hang: RPC calls, the server's wait for pushes
and the graceful RPC shutdown are all bounded by ``--dist-timeout``; an error on the server (a NaN
loss, a trainer that stopped answering) is sent to every trainer as the answer to its next call;
and when torchrun stops the surviving ranks (SIGTERM, after one rank failed) they say so.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import Any

import torch
from torch.distributed.rpc.functions import async_execution

from build_models.errors import BuildError
from build_models.training import loop
from build_models.training.distributed import World, first_line

# RPC runs a function by its qualified name in the callee's process: the module-level ``_pull`` and
# ``_push`` below reach the server object through this slot, set on rank 0 only while it trains.
_SERVER: "_Server | None" = None


def _worker(rank: int) -> str:
    return f"rank{rank}"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _submit(kind: str, payload: tuple) -> torch.futures.Future:
    server = _SERVER
    if server is None:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(("error", "rank 0 is not serving parameters (is it running the same build?)"))
        return fut
    return server.submit(kind, payload)


@async_execution
def _pull(rank: int) -> torch.futures.Future:
    """A trainer asks for work: answered ("work", params, version, step, shard), ("done",) or ("error", msg)."""
    return _submit("pull", (rank,))


@async_execution
def _push(rank: int, step: int, shard: int, version: int, grad: torch.Tensor, loss: float,
          missing: tuple[int, ...]) -> torch.futures.Future:
    """A trainer's gradient for (step, shard), computed on parameters of ``version``: answered ("ok",),
    ("stale", staleness) when refused, or ("error", msg)."""
    return _submit("push", (rank, step, shard, version, grad, loss, missing))


class ParameterServer:
    """Rank 0 holds the parameters and optimiser; ranks 1..N-1 compute gradients over RPC."""

    name = "parameter_server"

    def __init__(self, world: World):
        self.world = world
        self.trainers = world.size - 1

    @classmethod
    def for_world(cls, world: World, batch_size: int, step: str) -> "ParameterServer":
        """Checked before any training: a server needs trainers, and they need equal shards."""
        if world.size < 2:
            raise BuildError(f"{step}: strategy 'parameter_server' needs a server and at least one trainer, but "
                             f"this world has {world.size} process; launch with torchrun --nproc_per_node 3 "
                             f"(rank 0 serves, ranks 1..2 train)")
        trainers = world.size - 1
        if batch_size % trainers:
            raise BuildError(f"{step}: batch_size {batch_size} does not split evenly over the {trainers} "
                             f"parameter-server trainers (ranks 1..{trainers}); use a multiple of {trainers}")
        return cls(world)

    def fit(self, session) -> None:
        cfg, world, outcome = session.cfg, self.world, session.outcome
        outcome.rows_per_rank = cfg.batch_size // self.trainers
        server = None
        if world.is_main:
            server = _Server(session, self.trainers, cfg.parameter_server_mode, cfg.max_staleness,
                             world.timeout_s)
        global _SERVER
        try:
            _SERVER = server
            _init_rpc(world)
            restore = _stop_on_sigterm(world.rank)  # only while training: shutdown must not be interrupted
            try:
                if server is not None:
                    server.serve()
                    outcome.details = server.summary()
                else:
                    _Trainer(session, world, self.trainers).run()
            except BaseException as exc:
                restore()
                # No graceful shutdown after a failure: it waits (several timeouts in a row) for ranks
                # that may be gone. A failing server first gives its error answers a moment to leave,
                # so the trainers can say why it stopped; under SIGTERM every rank is going anyway.
                if server is not None and not isinstance(exc, _Stopped):
                    time.sleep(1.0)
                _shutdown_rpc(graceful=False)
                raise
            restore()
            _shutdown_rpc(graceful=True, timeout_s=world.timeout_s)
        finally:
            _SERVER = None
        # Every rank ends like a DDP rank: the trained weights, the losses and the details.
        final = world.broadcast({"losses": outcome.losses, "details": outcome.details} if world.is_main else None)
        outcome.losses, outcome.details = list(final["losses"]), dict(final["details"])
        _broadcast_parameters(world, session.params)


def _init_rpc(world: World) -> None:
    from torch.distributed import rpc

    # env:// under torchrun meets on the launcher's own store (TORCHELASTIC_USE_AGENT_STORE), the one
    # the gloo group met on; RPC keeps its keys apart under its own prefix. Without the agent, rank 0's
    # process already hosts that store and torch shares it (multi-tenant TCPStore), so no second port.
    options = rpc.TensorPipeRpcBackendOptions(init_method="env://", rpc_timeout=world.timeout_s)
    try:
        rpc.init_rpc(_worker(world.rank), rank=world.rank, world_size=world.size, rpc_backend_options=options)
    except (RuntimeError, ValueError) as exc:
        raise BuildError(f"rank {world.rank}: cannot start RPC for the parameter server ({first_line(exc)})") from None


def _shutdown_rpc(graceful: bool, timeout_s: float = 0.0) -> None:
    """Graceful (wait for every rank's outstanding calls, bounded) after success; local after a failure."""
    from torch.distributed import rpc

    log = logging.getLogger("torch.distributed.rpc.api")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its log of a failed wait is a traceback; our error says what happened
    try:
        if graceful:
            rpc.shutdown(graceful=True, timeout=timeout_s)
        else:
            rpc.shutdown(graceful=False)
    except Exception:  # noqa: BLE001 - shutdown finalises the local agent even when the wait fails
        pass
    finally:
        log.setLevel(level)


class _Stopped(BuildError):
    """The launcher stopped this rank."""


def _stop_on_sigterm(rank: int):
    """torchrun stops every rank with SIGTERM once one has failed: say so instead of vanishing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise _Stopped(f"rank {rank}: stopped by the launcher (SIGTERM) during parameter-server training; "
                         f"torchrun stops every rank when one fails: see the first failing rank's error")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _broadcast_parameters(world: World, params: list[torch.nn.Parameter]) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params]).to(world.device)
        dist.broadcast(flat, src=0)
        if not world.is_main:
            _load(params, flat)


def _load(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    with torch.no_grad():
        for p, value in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(value.view_as(p))


class _Server:
    """Rank 0's side. RPC threads only queue requests (``submit``); the main thread (``serve``) handles
    them one at a time, so the optimiser, progress bar, checkpoints and hooks all run where they do
    under the other strategies, and the state below needs no locks."""

    def __init__(self, session, trainers: int, mode: str, bound: int, timeout_s: float):
        self.session, self.trainers, self.mode, self.bound, self.timeout_s = session, trainers, mode, bound, timeout_s
        self.params = session.params
        self.sizes = [p.numel() for p in self.params]
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # orders ``error`` against ``submit``
        self.error: str | None = None
        self.pulls: dict[int, torch.futures.Future] = {}  # trainer rank -> its unanswered pull
        self.released: set[int] = set()  # trainers told there is no more work
        self.version = 0  # updates applied in this run
        self.step = session.outcome.resumed_at_step  # oldest global step not finished
        self.first_step, self.total = self.step, session.outcome.total_steps
        self.bytes = self.updates = self.refused = self.staleness_max = 0
        self._snapshot_of: tuple[int, torch.Tensor] | None = None
        # sync: who got the current step, the summed gradient and the shards' losses so far
        self.issued: dict[int, int] = {}
        self.grad_sum: torch.Tensor | None = None
        self.losses: dict[int, float] = {}
        # async: units u = step * trainers + shard, handed out in order
        self.next_unit = self.low = self.step * trainers  # low: oldest unit not applied
        self.held: dict[int, int] = {}  # trainer rank -> the unit it computes (again, after a refusal)
        self.applied_units: set[int] = set()
        self.step_losses: dict[int, dict[int, float]] = {}

    # ---------------------------------------------------------------- RPC threads

    def submit(self, kind: str, payload: tuple) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        with self.lock:
            if self.error is not None:
                fut.set_result(("error", self.error))
            else:
                self.inbox.put((kind, payload, fut))
        return fut

    # ---------------------------------------------------------------- main thread

    def serve(self) -> None:
        try:
            while len(self.released) < self.trainers:
                try:
                    kind, payload, fut = self.inbox.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise BuildError(self._stalled()) from None
                if kind == "pull":
                    self.pulls[payload[0]] = fut
                elif self.mode == "sync":
                    self._push_sync(fut, *payload)
                else:
                    self._push_async(fut, *payload)
                self._answer_pulls()
        except BaseException as exc:
            self._fail(str(exc) if isinstance(exc, BuildError)
                       else f"the parameter server (rank 0) failed: {type(exc).__name__}: {first_line(exc)}")
            raise
        if self.step != self.total:  # every trainer was released, so every unit was applied
            raise BuildError(f"parameter server: stopped at step {self.step} of {self.total}")

    def summary(self) -> dict[str, Any]:
        steps = self.total - self.first_step
        return {"mode": self.mode, "trainers": self.trainers, "max_staleness": self.bound,
                "staleness_max_applied": self.staleness_max, "pushes_refused": self.refused,
                "updates": self.updates, "bytes_per_step": self.bytes // steps if steps else 0,
                "bytes_total": self.bytes}

    def _stalled(self) -> str:
        quiet = [r for r in range(1, self.trainers + 1) if r not in self.pulls and r not in self.released]
        return (f"parameter server: no word from trainer rank(s) {quiet} for {self.timeout_s:g} s while "
                f"waiting for step {self.step + 1} of {self.total}; a trainer died or hangs "
                f"(the limit is --dist-timeout)")

    def _fail(self, message: str) -> None:
        """Tell every trainer, now or at its next call, why the server stopped."""
        with self.lock:
            self.error = message
        for fut in self.pulls.values():
            fut.set_result(("error", message))
        self.pulls.clear()
        while True:
            try:
                _kind, _payload, fut = self.inbox.get_nowait()
            except queue.Empty:
                return
            fut.set_result(("error", message))

    def _snapshot(self) -> torch.Tensor:
        """The parameters as one flat CPU tensor, made once per version and never modified after."""
        if self._snapshot_of is None or self._snapshot_of[0] != self.version:
            with torch.no_grad():
                flat = torch.cat([p.detach().reshape(-1) for p in self.params]).cpu()
            self._snapshot_of = (self.version, flat)
        return self._snapshot_of[1]

    def _answer_pulls(self) -> None:
        for rank in sorted(self.pulls):
            work = self._work_for(rank)
            if work is None:
                continue  # stays pending until the server moves on
            fut = self.pulls.pop(rank)
            if work == "done":
                self.released.add(rank)
                fut.set_result(("done",))
                continue
            flat = self._snapshot()
            self.bytes += _nbytes(flat)
            fut.set_result(("work", flat, self.version, *work))

    def _work_for(self, rank: int):
        if self.mode == "sync":
            if self.step >= self.total:
                return "done"
            if self.issued.get(rank) == self.step:
                return None  # it pushed this step already: wait for the update
            self.issued[rank] = self.step
            return self.step, rank - 1
        if rank in self.held:  # refused: the same unit on fresh parameters
            return divmod(self.held[rank], self.trainers)
        if self.next_unit >= self.total * self.trainers:
            return "done"
        if self.next_unit >= self.low + self.trainers:
            return None  # far enough ahead of the oldest unapplied unit
        self.held[rank] = self.next_unit
        self.next_unit += 1
        return divmod(self.held[rank], self.trainers)

    def _set_grads(self, flat: torch.Tensor, missing: tuple[int, ...]) -> None:
        # Parameters the loss never reached keep no gradient, as in one process (AdamW skips them).
        for i, (p, g) in enumerate(zip(self.params, flat.split(self.sizes))):
            p.grad = None if i in missing else g.view_as(p).to(p.device)

    def _push_sync(self, fut, rank, step, shard, version, grad, loss, missing) -> None:
        if step != self.step or shard in self.losses:
            raise BuildError(f"parameter server: trainer rank {rank} pushed step {step + 1} shard {shard} "
                             f"while step {self.step + 1} was open")
        self.bytes += _nbytes(grad)
        self.grad_sum = grad if self.grad_sum is None else self.grad_sum.add_(grad)
        self.losses[shard] = loss
        fut.set_result(("ok",))
        if len(self.losses) < self.trainers:
            return
        value = sum(self.losses[s] for s in range(self.trainers)) / self.trainers
        self.session.check(value, step)
        self._set_grads(self.grad_sum.div_(self.trainers), missing)
        self.session.apply()
        self.session.optimizer.zero_grad(set_to_none=True)
        self.grad_sum, self.losses = None, {}
        self.version += 1
        self.updates += 1
        self.step += 1
        self.session.finish_step(step, value)

    def _push_async(self, fut, rank, step, shard, version, grad, loss, missing) -> None:
        unit = step * self.trainers + shard
        if self.held.get(rank) != unit:
            raise BuildError(f"parameter server: trainer rank {rank} pushed step {step + 1} shard {shard}, "
                             f"which it does not hold")
        self.bytes += _nbytes(grad)
        staleness = self.version - version
        if staleness > self.bound:
            self.refused += 1
            fut.set_result(("stale", staleness))  # it keeps the unit and fetches again
            return
        self.session.check(loss, step)
        self._set_grads(grad, missing)
        self.session.apply(schedule=False)  # the schedule steps once per global batch, below
        self.session.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        self.updates += 1
        self.staleness_max = max(self.staleness_max, staleness)
        del self.held[rank]
        self.step_losses.setdefault(step, {})[shard] = loss
        self.applied_units.add(unit)
        while self.low in self.applied_units:
            self.applied_units.remove(self.low)
            self.low += 1
        fut.set_result(("ok",))
        while self.step < self.total and self.low >= (self.step + 1) * self.trainers:
            losses = self.step_losses.pop(self.step)
            value = sum(losses[s] for s in range(self.trainers)) / self.trainers
            self.session.check(value, self.step)
            self.session.scheduler.step()
            self.step += 1
            self.session.finish_step(self.step - 1, value)


class _Trainer:
    """A trainer rank: fetch, compute one shard's gradient, push, until the server says done."""

    def __init__(self, session, world: World, trainers: int):
        self.session, self.world = session, world
        self.per = session.cfg.batch_size // trainers

    def run(self) -> None:
        session, params = self.session, self.session.params
        while True:
            reply = self._call(_pull, (self.world.rank,))
            if reply[0] == "done":
                return
            _, flat, version, step, shard = reply
            _load(params, flat)
            rows = session.rows(step)[shard * self.per:(shard + 1) * self.per]
            for p in params:
                p.grad = None
            loss = session.loss_fn(session.forward, rows)
            loss.backward()
            missing = tuple(i for i, p in enumerate(params) if p.grad is None)
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params]).cpu()
            for p in params:
                p.grad = None
            reply = self._call(_push, (self.world.rank, step, shard, version, grad, float(loss.item()), missing))
            if reply[0] == "ok":
                loop.after_step(step + 1)  # this trainer's share of step + 1 is in

    def _call(self, fn, args: tuple):
        from torch.distributed import rpc

        rank = self.world.rank
        try:
            # A little longer than the server waits for a silent trainer, so that when it gives up
            # its explanation reaches the others before their own timeouts do.
            fut = rpc.rpc_async(_worker(0), fn, args=args, timeout=self.world.timeout_s + 10)
        except RuntimeError as exc:
            raise BuildError(f"rank {rank}: cannot reach the parameter server on rank 0 ({first_line(exc)})") from None
        arrived = threading.Event()
        fut.add_done_callback(lambda _f: arrived.set())
        while not arrived.wait(1.0):
            pass  # short waits, so the SIGTERM handler can run
        try:
            reply = fut.wait()
        except RuntimeError as exc:
            raise BuildError(f"rank {rank}: lost the parameter server on rank 0 ({first_line(exc)})") from None
        if reply[0] == "error":
            raise BuildError(f"rank {rank}: the parameter server stopped: {reply[1]}")
        return reply
