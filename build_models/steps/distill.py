"""Knowledge distillation into a smaller student (single process; data-parallel training comes next).

The student starts from the teacher (the model as it stands: the original, or a pruned one) by layer
selection, e.g. 6 to 3 layers keeping layers 1, 3, 5, and is trained to mimic the teacher on real,
unlabeled text from a bundled corpus's train split (never the evaluation split):
- embedding models: cosine or MSE between student and teacher sentence embeddings, plus optionally MSE
  between each student layer's hidden states and its teacher layer's;
- classifiers: KL divergence of temperature-softened logits, scaled by T^2, plus cross-entropy on the
  corpus labels when they are the model's own labels.
A progress bar shows step, loss and time left. Checkpoints (student, optimizer, scheduler, RNG, step)
are written every `checkpoint_every` steps under the build's checkpoint folder, keyed by everything that
decides the result, so an interrupted build resumes where it stopped and ends with the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import EmbeddingModel, encoder_config, encoder_layers, inner_model
from build_models.recipe import DistillConfig


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


def _texts(cfg: DistillConfig) -> tuple[list[str], list[str]]:
    from build_models.corpora import load_split

    data = load_split(cfg.dataset, "train")
    pairs = [(t, l) for t, l in zip(data.texts, data.labels) if t.strip()]
    random.Random(cfg.seed).shuffle(pairs)
    pairs = pairs[: cfg.samples]
    if len(pairs) < cfg.batch_size:
        raise BuildError(f"distill: {len(pairs)} training texts in {cfg.dataset}; need at least one batch of "
                         f"{cfg.batch_size}")
    return [t for t, _ in pairs], [l for _, l in pairs]


def _label_ids(model: nn.Module, corpus_labels: list[str]) -> list[int] | None:
    """The corpus labels as the classifier's class ids, when they are its own labels; else None."""
    if isinstance(model, EmbeddingModel):
        return None
    id2label = getattr(encoder_config(model), "id2label", None) or {}
    label2id = {str(v): int(k) for k, v in id2label.items()}
    if not corpus_labels or not set(corpus_labels) <= set(label2id):
        return None
    return [label2id[l] for l in corpus_labels]


def _checkpoint_path(cfg: DistillConfig, ctx: BuildContext, teacher: nn.Module, keep: list[int]) -> Path | None:
    if ctx.checkpoint_dir is None:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    digest.update(json.dumps(keep).encode())
    digest.update(str(ctx.source.path if ctx.source else "").encode())
    for name, tensor in sorted(teacher.state_dict().items()):  # a pruned teacher is another teacher
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(float(tensor.float().sum())).encode())
    return ctx.checkpoint_dir / f"distill-{digest.hexdigest()[:16]}.pt"


def _loss(cfg: DistillConfig, student: nn.Module, teacher: nn.Module, batch, labels, keep: list[int]) -> torch.Tensor:
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    if isinstance(student, EmbeddingModel):
        kwargs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": cfg.hidden_loss_weight > 0,
                  "return_dict": True}
        if types is not None:
            kwargs["token_type_ids"] = types
        s_out = student.encoder(**kwargs)
        with torch.no_grad():
            t_out = teacher.encoder(**kwargs)
        s_emb = student.pool(s_out.last_hidden_state, mask)
        t_emb = teacher.pool(t_out.last_hidden_state, mask)
        if cfg.loss == "cosine":
            loss = (1 - nn.functional.cosine_similarity(s_emb, t_emb, dim=-1)).mean()
        else:
            loss = nn.functional.mse_loss(s_emb, t_emb)
        if cfg.hidden_loss_weight > 0:
            # hidden_states[0] are the embeddings; student layer j mimics teacher layer keep[j].
            hidden = sum(nn.functional.mse_loss(s_out.hidden_states[j + 1], t_out.hidden_states[k + 1])
                         for j, k in enumerate(keep)) / len(keep)
            loss = loss + cfg.hidden_loss_weight * hidden
        return loss
    s_logits = student(ids, mask, types)
    with torch.no_grad():
        t_logits = teacher(ids, mask, types)
    t = cfg.temperature
    loss = nn.functional.kl_div(nn.functional.log_softmax(s_logits / t, dim=-1),
                                nn.functional.softmax(t_logits / t, dim=-1), reduction="batchmean") * t * t
    if labels is not None and cfg.ce_weight > 0:
        loss = loss + cfg.ce_weight * nn.functional.cross_entropy(s_logits, labels)
    return loss


def _after_step(step: int) -> None:
    """Called after every optimizer step; tests replace it to interrupt a run."""


def run(cfg: DistillConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "torch" or art.module is None:
        raise BuildError(f"distill needs the PyTorch model: put it before export (got {art.kind})")
    if art.precision != "fp32":
        raise BuildError("distill trains in fp32: put quantize after it")
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    teacher = art.module.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_depth = len(encoder_layers(teacher, "distill"))
    keep = student_layers(cfg, teacher_depth)
    student = make_student(teacher, keep)
    texts, corpus_labels = _texts(cfg)
    label_ids = _label_ids(teacher, corpus_labels)
    steps_per_epoch = len(texts) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs

    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    start, losses = 0, []
    checkpoint = _checkpoint_path(cfg, ctx, teacher, keep)
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)  # our own file, written below
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"]

    began = time.perf_counter()
    student.train()
    bar = tqdm(total=total, initial=start, desc="distill", unit="step", disable=not cfg.progress)
    try:
        for step in range(start, total):
            epoch, index = divmod(step, steps_per_epoch)
            order = list(range(len(texts)))
            random.Random(cfg.seed + epoch).shuffle(order)
            rows = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
            batch = ctx.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                  max_length=cfg.max_seq_len, return_tensors="pt")
            labels = torch.tensor([label_ids[i] for i in rows]) if label_ids is not None else None
            loss = _loss(cfg, student, teacher, batch, labels, keep)
            if not torch.isfinite(loss):
                raise BuildError(f"distill: the loss became {loss.item()} at step {step + 1}; lower learning_rate "
                                 f"(now {cfg.learning_rate})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            value = loss.item()
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            done = step + 1
            if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == total):
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": done,
                            "losses": losses}, tmp)
                tmp.replace(checkpoint)  # never a half-written checkpoint
            _after_step(done)
    finally:
        bar.close()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    window = max(1, min(10, len(losses) // 4))
    details = {
        "teacher_layers": teacher_depth, "student_layers": keep, "steps": total, "resumed_at_step": start,
        "texts": len(texts), "dataset": cfg.dataset, "used_labels": label_ids is not None, "loss_first": round(sum(losses[:window]) / window, 6),
        "loss_last": round(sum(losses[-window:]) / window, 6), "seconds": round(time.perf_counter() - began, 1),
        "params": sum(p.numel() for p in student.parameters()),
    }
    return Artifact(kind="torch", precision="fp32", module=student), details

