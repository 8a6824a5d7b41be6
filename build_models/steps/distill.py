"""Knowledge distillation into a smaller student, in one process or data-parallel under torchrun.

The student starts from the model as it stands (the original, or a pruned one) by layer selection,
e.g. 6 to 3 layers keeping layers 1, 3, 5, and is trained to mimic its teacher (by default the recipe's
fp32 reference, so a pruned student learns back toward the original) on real, unlabeled text from a
bundled corpus's train split (never the evaluation split):
- embedding models: cosine or MSE between student and teacher sentence embeddings, plus optionally MSE
  between each student layer's hidden states and its teacher layer's;
- classifiers: KL divergence of temperature-softened logits, scaled by T^2, plus cross-entropy on the
  corpus labels when they are the model's own labels.
A progress bar shows step, loss and time left. Checkpoints (student, optimizer, scheduler, RNG, step)
are written every `checkpoint_every` steps under the build's checkpoint folder, keyed by everything that
decides the result, so an interrupted build resumes where it stopped and ends with the same weights.
Under torchrun the same step trains data-parallel or as a pipeline of stages (build_models/training/).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import EmbeddingModel, encoder_config, encoder_layers, inner_model
from build_models.recipe import DistillConfig
from build_models.training.data import tokenize_rows, training_corpus
from build_models.training.loop import StagedTask, checkpoint_key, train
from build_models.training.strategy import NOT_IN_RESULT, resolve_strategy


def student_layers(cfg: DistillConfig, teacher_layers: int) -> list[int]:
    """Teacher layers the student keeps: explicit, or evenly spaced ending at the last layer."""
    if cfg.layers is not None:
        chosen = list(cfg.layers)
        bad = [i for i in chosen if not 0 <= i < teacher_layers]
        if bad:
            raise BuildError(f"distill: layers {bad} do not exist; the teacher has layers 0..{teacher_layers - 1}")
        if sorted(set(chosen)) != chosen:
            raise BuildError(f"distill: layers must be increasing and distinct, got {chosen}")
        return chosen
    n = cfg.num_layers
    if n > teacher_layers:
        raise BuildError(f"distill: a student of {n} layers is larger than its teacher of {teacher_layers} layers")
    return [round((i + 1) * teacher_layers / n) - 1 for i in range(n)]


def make_student(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of the teacher with only the ``keep`` layers (weights copied, pruned heads remapped)."""
    student = copy.deepcopy(teacher)
    layers = encoder_layers(student, "distill")
    base = getattr(inner_model(student), "base_model", inner_model(student))
    base.encoder.layer = nn.ModuleList([layers[i] for i in keep])
    config = encoder_config(student)
    config.num_hidden_layers = len(keep)
    if config.pruned_heads:
        config.pruned_heads = {new: config.pruned_heads[old] for new, old in enumerate(keep)
                               if old in config.pruned_heads}
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _label_ids(model: nn.Module, corpus_labels: list[str]) -> list[int] | None:
    """The corpus labels as the classifier's class ids, when they are its own labels; else None."""
    if isinstance(model, EmbeddingModel):
        return None
    id2label = getattr(encoder_config(model), "id2label", None) or {}
    label2id = {str(v): int(k) for k, v in id2label.items()}
    if not corpus_labels or not set(corpus_labels) <= set(label2id):
        return None
    return [label2id[l] for l in corpus_labels]


def encode_parts(model: nn.Module, input_ids, attention_mask, token_type_ids, hidden: bool, attentions: bool):
    """(output, each layer's hidden states, each layer's attention maps) of an embedding model or a
    classifier; the lists are empty unless asked for. Attention maps need eager attention (the
    reference is loaded with it, and students are copies of it)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True,
              "output_hidden_states": hidden, "output_attentions": attentions}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    if isinstance(model, EmbeddingModel):
        out = model.encoder(**kwargs)
        output = model.pool(out.last_hidden_state, attention_mask)
    else:
        out = model.classifier(**kwargs)
        output = out.logits
    # hidden_states[0] is the embeddings' output; the loss compares the layers' outputs.
    return output, list(out.hidden_states[1:]) if hidden else [], list(out.attentions) if attentions else []


class StudentForward(nn.Module):
    """The student's forward as one module call (what DDP wraps): the sentence embedding or logits;
    with ``hidden`` and/or ``attentions``, (output, each layer's hidden states..., each layer's
    attention maps...) for the TinyBERT losses; with ``hidden`` alone it is the output a pipeline's
    last stage gives."""

    def __init__(self, student: nn.Module, hidden: bool, attentions: bool = False):
        super().__init__()
        self.student, self.hidden, self.attentions = student, hidden, attentions

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if not (self.hidden or self.attentions):
            return self.student(input_ids, attention_mask, token_type_ids)
        output, states, maps = encode_parts(self.student, input_ids, attention_mask, token_type_ids,
                                            self.hidden, self.attentions)
        return (output, *states, *maps)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error over each sequence's real tokens, averaged per sequence, then over the batch:
    padding never counts, and equal shards of a batch average to the whole batch's value."""
    m = mask.unsqueeze(-1).to(a.dtype)
    per_sequence = ((a - b) ** 2 * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * a.shape[-1]).clamp(min=1)
    return per_sequence.mean()


def _attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each head's attention distribution over the keys (MiniLM's form of
    TinyBERT's attention transfer), averaged over the real query tokens and heads of each sequence,
    then over the batch. Padded keys hold zero probability in both, so they add nothing."""
    eps = 1e-9
    kl = (teacher * ((teacher + eps).log() - (student + eps).log())).sum(dim=-1)  # [B, H, T]
    m = mask.unsqueeze(1).to(kl.dtype)
    per_sequence = (kl * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * kl.shape[1]).clamp(min=1)
    return per_sequence.mean()


def kept_heads(student: nn.Module, teacher_heads: int) -> list[list[int]] | None:
    """For each student layer, the teacher heads its remaining heads came from (pruning keeps their
    order); None when no head was pruned."""
    config = encoder_config(student)
    pruned = config.pruned_heads or {}
    if not pruned:
        return None
    return [[h for h in range(teacher_heads) if h not in set(pruned.get(j, ()))]
            for j in range(config.num_hidden_layers)]


class DistillTask(StagedTask):
    """The distillation loss in parts (loop.StagedTask): the teacher's outputs are the target.

    The target packs, per row: the teacher's sentence embedding or logits (plus the label as a float
    column when the cross-entropy term applies); with a hidden-state or attention loss also the
    attention mask, the teacher's hidden states of the kept layers and their attention maps (the heads
    the student kept), all in one [B, N] tensor so a pipeline schedule can split it into micro-batches."""

    def __init__(self, cfg: DistillConfig, teacher: nn.Module, keep: list[int], tokenizer, texts: list[str],
                 label_ids: list[int] | None, device, heads: list[list[int]] | None = None):
        self.cfg, self.teacher, self.keep, self.tokenizer, self.texts = cfg, teacher, keep, tokenizer, texts
        self.label_ids, self.device, self.heads = label_ids, device, heads
        self.embedding = isinstance(teacher, EmbeddingModel)
        self.carry_hidden = cfg.hidden_loss_weight > 0
        self.carry_attention = cfg.attention_loss_weight > 0
        self.use_labels = not self.embedding and label_ids is not None and cfg.ce_weight > 0

    def inputs(self, rows: list[int]):
        return tokenize_rows(self.tokenizer, self.texts, rows, self.cfg.max_seq_len, self.device)

    @torch.no_grad()
    def target(self, rows: list[int], inputs) -> torch.Tensor:
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
        if not (self.carry_hidden or self.carry_attention):
            main, states, maps = self.teacher(ids, mask, types), [], []
        else:
            main, states, maps = encode_parts(self.teacher, ids, mask, types, self.carry_hidden,
                                              self.carry_attention)
        parts = [main]
        if self.use_labels:
            labels = torch.tensor([self.label_ids[i] for i in rows], device=main.device, dtype=main.dtype)
            parts.append(labels.unsqueeze(1))  # class ids are exact in float32
        if self.carry_hidden or self.carry_attention:
            parts.append(mask.to(main.dtype))
        if self.carry_hidden:
            # Student layer j mimics teacher layer keep[j].
            parts.append(torch.stack([states[k] for k in self.keep], dim=1).flatten(1))  # [B, L*T*H]
        if self.carry_attention:
            chosen = [maps[k] if self.heads is None else maps[k][:, self.heads[j]] for j, k in enumerate(self.keep)]
            parts.append(torch.cat([m.flatten(1) for m in chosen], dim=1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        s_out, *rest = output if isinstance(output, tuple) else (output,)
        layers = len(self.keep)
        s_hidden = rest[:layers] if self.carry_hidden else []
        s_maps = rest[len(s_hidden):]
        width = s_out.shape[-1]
        at = width + (1 if self.use_labels else 0)
        if not self.embedding:
            t = cfg.temperature
            loss = nn.functional.kl_div(nn.functional.log_softmax(s_out / t, dim=-1),
                                        nn.functional.softmax(target[:, :width] / t, dim=-1),
                                        reduction="batchmean") * t * t
            if self.use_labels:
                loss = loss + cfg.ce_weight * nn.functional.cross_entropy(s_out, target[:, width].long())
        else:
            t_emb = target[:, :width]
            if cfg.loss == "cosine":
                loss = (1 - nn.functional.cosine_similarity(s_out, t_emb, dim=-1)).mean()
            else:
                loss = nn.functional.mse_loss(s_out, t_emb)
        if not (self.carry_hidden or self.carry_attention):
            return loss
        rows = s_out.shape[0]
        length = (s_hidden[0].shape[1] if s_hidden else s_maps[0].shape[-1])
        mask = target[:, at:at + length]
        at += length
        if self.carry_hidden:
            size = s_hidden[0].shape[-1]
            t_hidden = target[:, at:at + layers * length * size].view(rows, layers, length, size)
            at += layers * length * size
            hidden = sum(_masked_mse(s, t_hidden[:, j], mask) for j, s in enumerate(s_hidden)) / layers
            loss = loss + cfg.hidden_loss_weight * hidden
        if self.carry_attention:
            kl = 0.0
            for s in s_maps:
                n = s[0].numel()
                kl = kl + _attention_kl(s, target[:, at:at + n].view_as(s), mask)
                at += n
            loss = loss + cfg.attention_loss_weight * kl / layers
        return loss


def _teacher(cfg: DistillConfig, art: Artifact, ctx: BuildContext) -> nn.Module:
    """The model the student mimics, frozen in eval mode: the recipe's fp32 reference, or the model as
    it stands (distill and qat both start here)."""
    teacher = art.module if cfg.teacher == "current" or ctx.reference is None else ctx.reference
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run(cfg: DistillConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "torch" or art.module is None:
        raise BuildError(f"distill needs the PyTorch model: put it before export (got {art.kind})")
    if art.precision != "fp32":
        raise BuildError("distill trains in fp32: put quantize after it")
    world = ctx.world
    teacher = _teacher(cfg, art, ctx)
    start_from = art.module
    depth = len(encoder_layers(start_from, "distill"))
    keep = student_layers(cfg, depth)
    strategy = resolve_strategy(cfg.strategy, world, cfg.batch_size, "distill", layers=len(keep),
                                micro_batches=cfg.micro_batches, schedule=cfg.pipeline_schedule)
    check_layer_losses("distill", cfg, depth, len(encoder_layers(teacher, "distill")))
    student = make_student(start_from, keep)
    details = train_student("distill", cfg, student, start_from, teacher, keep, ctx, strategy)
    details["params"] = sum(p.numel() for p in student.parameters())
    return Artifact(kind="torch", precision="fp32", module=student.cpu()), details


def check_layer_losses(step: str, cfg: DistillConfig, depth: int, teacher_depth: int) -> None:
    """The hidden-state and attention losses pair student layers with teacher layers by index."""
    if (cfg.hidden_loss_weight > 0 or cfg.attention_loss_weight > 0) and teacher_depth != depth:
        raise BuildError(f"{step}: the hidden-state and attention losses map student layers to teacher layers by "
                         f"index, but the model has {depth} layers and its teacher {teacher_depth}; set "
                         f"hidden_loss_weight: 0 and attention_loss_weight: 0")


def train_student(step: str, cfg: DistillConfig, student: nn.Module, start_from: nn.Module, teacher: nn.Module,
                  keep: list[int], ctx: BuildContext, strategy) -> dict:
    """Train ``student`` (teacher layers ``keep`` of ``start_from``) in place to mimic ``teacher`` with
    the distillation losses on the step's text, in the loop with its checkpoints and strategy; what
    distill and qat share. Returns the details both record."""
    world = ctx.world
    texts, corpus_labels, text_details = training_corpus(step, cfg, ctx.evaluation_texts)
    label_ids = _label_ids(teacher, corpus_labels)
    student.to(world.device)
    heads = kept_heads(student, encoder_config(teacher).num_attention_heads)
    teacher.to(world.device)
    checkpoint = None
    if ctx.checkpoint_dir is not None:
        # The config carries every setting (for qat also the quantization): another never resumes this one.
        key = checkpoint_key(cfg.model_dump(exclude=NOT_IN_RESULT), keep,
                             str(ctx.source.path if ctx.source else ""), start_from, teacher)
        checkpoint = ctx.checkpoint_dir / f"{step}-{key}.pt"
    task = DistillTask(cfg, teacher, keep, ctx.tokenizer, texts, label_ids, world.device, heads)
    outcome = train(step, cfg, student, StudentForward(student, task.carry_hidden, task.carry_attention),
                    len(texts), task, world, strategy, checkpoint)
    student.cpu()
    teacher.cpu()
    return {
        "teacher": cfg.teacher if ctx.reference is not None else "current",
        "teacher_layers": len(encoder_layers(teacher, step)), "student_layers": keep, "texts": len(texts),
        "dataset": cfg.dataset, "used_labels": label_ids is not None, **text_details, **outcome.summary(),
    }
