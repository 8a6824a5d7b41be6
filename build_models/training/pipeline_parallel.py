"""The ``pipeline`` strategy: the encoder cut into consecutive stages, one per rank, with each global
batch cut into micro-batches that torch.distributed.pipelining schedules through them (GPipe or 1F1B).

Design, and why:

- Stages are built by hand from the trained model (``EncoderStage``): stage 0 holds the embeddings and
  the first layers, the last stage the remaining layers, the pooling (+ normalisation) or the
  classifier head, and the loss. Hand-built ``PipelineStage``s are used rather than ``pipeline()``
  tracing, because exporting Hugging Face BERT with torch.export is fragile (data-dependent mask
  code, version drift), while a stage that calls the model's own embeddings and layer modules is
  plain eager PyTorch. The stages share their parameters with the session's model, so training a
  stage trains the model in place.
- Layers are balanced over the stages, the extra ones going to the earlier stages: the last stage
  also runs the head, the loss and (for distillation) the teacher that makes the target.
- Only parameter-dependent tensors travel between stages: the hidden states, and with the
  hidden-state loss (``StagedTask.carry_hidden``) every layer's hidden states so far, since the loss
  on the last stage compares each of them with the teacher's. Everything else a stage needs (the
  attention mask, the target) every rank computes itself from the batch: all ranks tokenize the
  same global batch, as under DDP, so shapes are known everywhere without messages. The mask goes
  to each stage as a keyword argument, which the schedule splits into micro-batches like the inputs.
- Stage metadata is given statically (shapes from the batch, ``_stage_metas``), so no forward and
  backward inference pass runs; a batch of a new padded length gets its own stage and schedule
  (recv buffers are sized per shape), a few kept in a small cache.
- The loss per micro-batch is a per-example mean and the schedules run with ``scale_grads=True``,
  which divides the summed gradients of the micro-batches by their number after the last backward
  (``perform_reduce_grad`` in torch 2.13): with equal micro-batches that is the whole batch's
  gradient, as one process computes it. ``batch_size`` must therefore divide by ``micro_batches``.
- Each rank's optimizer is the session's (over all parameters) but only the local stage's
  parameters get gradients, and torch's optimizers skip parameters without one. Clipping uses the
  global norm: one all-reduce per step carries the squared local norms together with the loss
  (which only the last stage knows) and the bytes sent, so every rank clips by the same factor,
  sees the same loss for the NaN guard and progress, and steps its scheduler the same.
- Before each checkpoint and after the last step every stage broadcasts its parameters to all ranks
  (``_share_parameters``), so rank 0, which alone evaluates, exports and publishes, holds the whole
  trained model, checkpoints hold the whole model, and a later step on any rank (a finetuned
  teacher that every rank reloads, a second distill) starts from the same weights everywhere. At
  checkpoints the optimizer state of the other stages is gathered to rank 0 too, so a resumed run
  (whatever its strategy) continues with the full state.
- Communication is counted where it happens: the tensors each stage hands to its send ops, forward
  activations and backward gradients, summed over micro-batches and ranks per step
  (``bytes_per_step`` in the step's details), and the parameter sharing separately (``gather_bytes``).

On CPU the stages are gloo processes; on CUDA each rank's stage runs on its own device
(``World.device``) and the messages go over NCCL.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from build_models.errors import BuildError
from build_models.modeling import ClassificationModel, EmbeddingModel, encoder_layers, inner_model, pool
from build_models.training.distributed import World, first_line, lost_a_peer

SCHEDULES = ("gpipe", "1f1b")
_SCHEDULE_CACHE = 4  # stages kept for recent padded lengths


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive layer ranges, one per stage, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class EncoderStage(nn.Module):
    """One pipeline stage of an EmbeddingModel or ClassificationModel, sharing its modules.

    ``forward(*hidden, attention_mask=mask)``: stage 0 takes (input_ids[, token_type_ids]) instead of
    hidden states. A stage that is not last returns its last layer's hidden states, or with
    ``carry_hidden`` the hidden states of every layer so far (the last one continuing the encoder).
    The last stage returns what the unsplit model returns: the sentence embedding or the logits, or
    with ``carry_hidden`` (embedding, each layer's hidden states...)."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool, carry_hidden: bool):
        super().__init__()
        hf = inner_model(model)
        base = getattr(hf, "base_model", hf)
        all_layers = encoder_layers(model, "pipeline")
        self.first, self.last, self.carry_hidden = first, last, carry_hidden
        self.embeddings = base.embeddings if first else None
        self.layers = nn.ModuleList([all_layers[i] for i in layers])
        self._extend_mask = base.get_extended_attention_mask  # a bound method, not a submodule
        self._sdpa_mask = (getattr(base, "attn_implementation", None) == "sdpa"
                           and getattr(base, "position_embedding_type", "absolute") == "absolute")
        self.pooling = self.normalize = None
        self.pooler = self.dropout = self.classifier = None
        if not last:
            return
        if isinstance(model, EmbeddingModel):
            self.pooling, self.normalize = model.pooling, model.normalize
        elif isinstance(model, ClassificationModel):
            if isinstance(getattr(hf, "classifier", None), nn.Linear) and getattr(base, "pooler", None) is not None:
                # BERT: pooler ([CLS] + dense + tanh), dropout, linear
                self.pooler, self.dropout, self.classifier = base.pooler, hf.dropout, hf.classifier
            elif isinstance(getattr(hf, "classifier", None), nn.Module):
                self.classifier = hf.classifier  # RoBERTa: the head reads the token states itself
            else:
                raise BuildError(f"pipeline: no classifier head found on {type(hf).__name__}")
        else:
            raise BuildError(f"pipeline: cannot split a {type(model).__name__}")

    def _mask(self, attention_mask: torch.Tensor, dtype: torch.dtype):
        # What BertModel.forward does with a 2D mask, per micro-batch.
        if self._sdpa_mask:
            from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

            return _prepare_4d_attention_mask_for_sdpa(attention_mask, dtype, tgt_len=attention_mask.shape[1])
        return self._extend_mask(attention_mask, attention_mask.shape)

    def forward(self, *args, attention_mask):
        if self.first:
            input_ids, token_type_ids = args[0], (args[1] if len(args) > 1 else None)
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            states: list[torch.Tensor] = []
        else:
            hidden, states = args[-1], list(args)
        mask = self._mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
            states.append(hidden)
        if not self.last:
            return tuple(states) if self.carry_hidden else (hidden,)
        if self.pooling is not None:
            output = pool(hidden, attention_mask, self.pooling, self.normalize)
        elif self.pooler is not None:
            output = self.classifier(self.dropout(self.pooler(hidden)))
        else:
            output = self.classifier(hidden)
        return (output, *states) if self.carry_hidden else output


def _output_width(model: nn.Module) -> int:
    hf = inner_model(model)
    if isinstance(model, EmbeddingModel):
        return hf.config.hidden_size
    return hf.config.num_labels


def _stage_metas(model: nn.Module, ranges: list[range], stage: int, rows: int, length: int, carry: bool,
                 with_token_types: bool):
    """Example (meta-device) inputs and outputs of ``stage`` for a micro-batch of ``rows`` x ``length``,
    so the PipelineStage needs no shape-inference pass."""
    hf = inner_model(model)
    dtype = next(model.parameters()).dtype
    hidden = hf.config.hidden_size

    def states(n: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty(rows, length, hidden, dtype=dtype, device="meta").requires_grad_(True)
                     for _ in range(n))

    done_before, done_after = ranges[stage].start, ranges[stage].stop
    if stage == 0:
        ids = torch.empty(rows, length, dtype=torch.long, device="meta")
        inputs = (ids, ids.clone()) if with_token_types else (ids,)
    else:
        inputs = states(done_before if carry else 1)
    if stage < len(ranges) - 1:
        outputs = states(done_after if carry else 1)
    else:
        head = torch.empty(rows, _output_width(model), dtype=dtype, device="meta").requires_grad_(True)
        outputs = (head, *states(done_after)) if carry else (head,)
    return inputs, outputs


def _schedule_class(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]


@functools.cache
def _counting_stage_class():
    from torch.distributed.pipelining import PipelineStage

    class CountingStage(PipelineStage):
        """A PipelineStage that adds up the bytes of the tensors it sends (activations, gradients)."""

        sent_forward = 0
        sent_backward = 0

        def get_fwd_send_ops(self, fwd_chunk_id):
            ops = super().get_fwd_send_ops(fwd_chunk_id)
            self.sent_forward += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops

        def get_bwd_send_ops(self, bwd_chunk_id):
            ops = super().get_bwd_send_ops(bwd_chunk_id)
            self.sent_backward += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops

    return CountingStage


class PipelineParallel:
    """Pipeline parallelism over the torchrun world: rank r runs stage r of the model."""

    name = "pipeline"

    def __init__(self, world: World, micro_batches: int, schedule: str):
        self.world, self.micro_batches, self.schedule = world, micro_batches, schedule

    @staticmethod
    def check(world: World, batch_size: int, step: str, layers: int | None, micro_batches: int,
              schedule: str) -> None:
        """Refuse, before any training, a world or settings this pipeline cannot run."""
        if world.size < 2:
            raise BuildError(f"{step}: strategy 'pipeline' needs one process per stage, at least 2; launch with "
                             f"torchrun --nproc_per_node N (N = stages)")
        if layers is not None and world.size > layers:
            raise BuildError(f"{step}: a pipeline of {world.size} stages needs at least {world.size} transformer "
                             f"layers (one per stage), the model has {layers}; use at most {layers} processes")
        if schedule not in SCHEDULES:
            raise BuildError(f"{step}: unknown pipeline_schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
        if micro_batches < 1:
            raise BuildError(f"{step}: micro_batches must be at least 1, got {micro_batches}")
        if batch_size % micro_batches:
            raise BuildError(f"{step}: batch_size {batch_size} does not split into {micro_batches} equal "
                             f"micro-batches; use a batch_size that micro_batches divides")
        if schedule == "1f1b" and micro_batches < world.size:
            raise BuildError(f"{step}: pipeline_schedule 1f1b needs at least one micro-batch per stage "
                             f"({world.size}), got micro_batches {micro_batches}")

    # ------------------------------------------------------------------ training

    def fit(self, session) -> None:
        task = session.task
        world, model = self.world, session.model
        layers = len(encoder_layers(model, "pipeline"))
        self.check(world, session.cfg.batch_size, session.name, layers, self.micro_batches, self.schedule)
        self.ranges = split_layers(layers, world.size)
        self.rank, self.last = world.rank, world.rank == world.size - 1
        self.task = task
        stages = [EncoderStage(model, r, i == 0, i == world.size - 1, task.carry_hidden)
                  for i, r in enumerate(self.ranges)]
        self.module = stages[self.rank]
        self.owned = [list(s.parameters()) for s in stages]  # every rank knows who trains what
        local = {id(p) for p in self.owned[self.rank]}
        self.local_params = [p for p in session.params if id(p) in local]
        self.schedules: OrderedDict[tuple, tuple] = OrderedDict()
        sent_forward = sent_backward = steps = 0
        self.gather_bytes = 0
        outcome = session.outcome
        for step in range(outcome.resumed_at_step, outcome.total_steps):
            rows = session.rows(step)
            outcome.rows_per_rank = len(rows)  # every stage sees every row, a micro-batch at a time
            batch = task.inputs(rows)
            schedule, stage = self._schedule_for(model, batch)
            stage.sent_forward = stage.sent_backward = 0
            session.optimizer.zero_grad(set_to_none=True)
            loss_sum = self._run(schedule, step, rows, batch)
            local_norm = (torch.nn.utils.get_total_norm([p.grad for p in self.local_params if p.grad is not None])
                          if any(p.grad is not None for p in self.local_params) else torch.zeros(()))
            value, total_norm, fwd, bwd = self._reduce(step, loss_sum, local_norm, stage)
            sent_forward, sent_backward, steps = sent_forward + fwd, sent_backward + bwd, steps + 1
            session.check(value, step)
            session.apply(total_norm=torch.tensor(total_norm, dtype=torch.float32, device=world.device))
            if session.checkpoints_after(step) or step + 1 == outcome.total_steps:
                self._share_parameters(step)
                if session.checkpoints_after(step):
                    self._gather_optimizer_state(session, step)
            session.finish_step(step, value)
        outcome.details = self._details(sent_forward, sent_backward, steps)

    def _details(self, sent_forward: int, sent_backward: int, steps: int) -> dict:
        per = max(steps, 1)
        return {"pipeline_schedule": self.schedule, "micro_batches": self.micro_batches,
                "stage_layers": [list(r) for r in self.ranges],
                "bytes_per_step": round((sent_forward + sent_backward) / per),
                "bytes_forward_per_step": round(sent_forward / per),
                "bytes_backward_per_step": round(sent_backward / per),
                "gather_bytes": self.gather_bytes}

    def _schedule_for(self, model: nn.Module, batch):
        """The stage and schedule for this batch's padded length (recv buffers are sized per shape)."""
        ids = batch["input_ids"]
        with_types = batch.get("token_type_ids") is not None
        key = (tuple(ids.shape), with_types)
        if key in self.schedules:
            self.schedules.move_to_end(key)
            return self.schedules[key]
        inputs, outputs = _stage_metas(model, self.ranges, self.rank, ids.shape[0] // self.micro_batches,
                                       ids.shape[1], self.task.carry_hidden, with_types)
        stage = _counting_stage_class()(self.module, self.rank, self.world.size, self.world.device,
                                        input_args=inputs, output_args=outputs)
        # The loss function goes to every rank: a schedule without one runs no backward at all.
        schedule = _schedule_class(self.schedule)(stage, n_microbatches=self.micro_batches,
                                                  loss_fn=self.task.loss, scale_grads=True)
        self.schedules[key] = (schedule, stage)
        if len(self.schedules) > _SCHEDULE_CACHE:
            self.schedules.popitem(last=False)  # same lengths in the same order on every rank
        return schedule, stage

    def _run(self, schedule, step: int, rows: list[int], batch) -> float:
        """One step of the schedule: forward and backward of every micro-batch; the summed
        per-micro-batch losses on the last stage, 0 elsewhere."""
        mask = batch["attention_mask"]
        losses: list[torch.Tensor] = []
        try:
            if self.rank == 0:
                args = (batch["input_ids"],) + ((batch["token_type_ids"],) if "token_type_ids" in batch else ())
                schedule.step(*args, attention_mask=mask, return_outputs=False)
            elif self.last:
                schedule.step(attention_mask=mask, target=self.task.target(rows, batch), losses=losses,
                              return_outputs=False)
            else:
                schedule.step(attention_mask=mask, return_outputs=False)
        except RuntimeError as exc:  # gloo reports a dead peer as a plain RuntimeError
            raise self._lost(step, exc) from exc
        return float(sum(float(l.detach()) for l in losses))

    def _reduce(self, step: int, loss_sum: float, local_norm: torch.Tensor, stage):
        """One all-reduce for what every rank must agree on: the step's loss (the mean over the
        micro-batches, known to the last stage), the global gradient norm, the bytes sent."""
        packed = torch.tensor([loss_sum / self.micro_batches, float(local_norm) ** 2, stage.sent_forward,
                               stage.sent_backward], dtype=torch.float64, device=self.world.device)
        try:
            dist.all_reduce(packed)
        except RuntimeError as exc:  # gloo reports a dead peer as a plain RuntimeError
            raise self._lost(step, exc) from exc
        value, squares, fwd, bwd = packed.tolist()
        return value, math.sqrt(squares), int(fwd), int(bwd)

    def _lost(self, step: int, exc: RuntimeError) -> RuntimeError:
        """A clear error when a schedule step or collective failed because a peer went away (gloo
        says so only in a RuntimeError's text); any other error unchanged."""
        if not lost_a_peer(exc):
            return exc
        first = first_line(exc)[:300]
        return BuildError(f"pipeline: stage {self.rank} of {self.world.size} lost its peers at step {step + 1} "
                          f"({first}); another rank died or stopped answering (its own error names the cause; "
                          f"each wait is bounded by --dist-timeout)")

    # ------------------------------------------------------------------ gathering

    def _share_parameters(self, step: int) -> None:
        """Every stage's parameters broadcast from its rank to all: the whole model everywhere."""
        with torch.no_grad():
            for owner, params in enumerate(self.owned):
                if not params:
                    continue
                if owner == self.rank:
                    flat = torch._utils._flatten_dense_tensors([p.detach() for p in params])
                else:
                    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                       device=self.world.device)
                try:
                    dist.broadcast(flat, src=owner)
                except RuntimeError as exc:  # gloo reports a dead peer as a plain RuntimeError
                    raise self._lost(step, exc) from exc
                self.gather_bytes += flat.numel() * flat.element_size() * (self.world.size - 1)
                if owner != self.rank:
                    for p, value in zip(params, torch._utils._unflatten_dense_tensors(flat, params)):
                        p.copy_(value)

    def _gather_optimizer_state(self, session, step: int) -> None:
        """The optimizer state of every stage's parameters on rank 0 (AdamW's moments; SGD has none),
        so its checkpoint resumes the whole model exactly."""
        optimizer = session.optimizer
        order = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        local = {id(p) for p in self.owned[self.rank]}
        mine = {i: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                for i, p in enumerate(order) if id(p) in local and p in optimizer.state}
        parts = [None] * self.world.size if self.world.is_main else None
        try:
            dist.gather_object(mine, parts, dst=0)
        except RuntimeError as exc:  # gloo reports a dead peer as a plain RuntimeError
            raise self._lost(step, exc) from exc
        if not self.world.is_main:
            return
        self.gather_bytes += sum(v.numel() * v.element_size() for part in parts[1:] for state in part.values()
                                 for v in state.values() if torch.is_tensor(v))
        full = optimizer.state_dict()
        for part in parts[1:]:
            full["state"].update(part)
        optimizer.load_state_dict(full)  # casts each state to its parameter's device
