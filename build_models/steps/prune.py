"""Structured pruning of attention heads and FFN neurons by importance (Michel et al., 2019).

Importance of a head is E_x |dL/dm_h|, the gradient of a loss with respect to a mask variable m_h = 1
that scales the head's output, over a calibration set of real text (the dataset's train split, never
its evaluation split); FFN neurons get the same treatment with a mask on the intermediate activations.
Scores are normalized per layer (L2), as in the paper, so layers compare.

The loss: classification models use cross-entropy on the model's own predictions (no labels needed,
and non-zero at the unpruned optimum); embedding models use an in-batch contrastive loss between the
masked model's embeddings and the unmasked model's (fixed) embeddings of the same texts, which measures
what an embedding model is for: telling texts apart. (A plain distance to the unmasked outputs would
have a zero gradient at m = 1.)

Counts are uniform per layer by default (every layer keeps `heads_per_layer` heads), which keeps ONNX
Runtime's attention fusion valid with one head count; `uniform_heads: false` ranks heads across layers
instead, and the optimizer then reads each layer's head count from the graph. FFN counts are always
uniform, so that `config.intermediate_size` stays true and a saved model reloads.
"""

from __future__ import annotations

import torch
from torch import nn

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import ClassificationModel, encoder_config, encoder_layers, inner_model
from build_models.recipe import PruneConfig


def plan_targets(cfg: PruneConfig, heads: int, ffn: int) -> tuple[int, int]:
    """Heads and FFN neurons to keep per layer; refuses targets the model cannot meet."""
    keep_heads = cfg.heads_per_layer if cfg.heads_per_layer is not None else (
        max(1, round(heads * cfg.ratio)) if cfg.ratio is not None else heads)
    keep_ffn = cfg.ffn_dim if cfg.ffn_dim is not None else (
        max(1, round(ffn * cfg.ratio)) if cfg.ratio is not None else ffn)
    if keep_heads > heads:
        raise BuildError(f"prune: heads_per_layer {keep_heads} is more than the model's {heads} heads per layer")
    if keep_heads < 1:
        raise BuildError("prune: removing every head of a layer is refused; keep at least one (heads_per_layer >= 1)")
    if keep_ffn > ffn:
        raise BuildError(f"prune: ffn_dim {keep_ffn} is more than the model's intermediate size {ffn}")
    return keep_heads, keep_ffn


def _calibration_batches(cfg: PruneConfig, ctx: BuildContext):
    from build_models.corpora import LabelledText, load_split, mixed_texts, normalized, stratified_sample

    if isinstance(cfg.dataset, list):
        # Importance measured on the mix: heads and neurons that matter only off one corpus's domain survive.
        data = mixed_texts(cfg.dataset, cfg.calibration_samples, cfg.seed, ctx.evaluation_texts,
                           cfg.passage_words).texts
    else:
        split = load_split(cfg.dataset, "train")
        kept = [i for i, t in enumerate(split.texts) if normalized(t) not in ctx.evaluation_texts]
        split = LabelledText([split.texts[i] for i in kept], [split.labels[i] for i in kept])
        data = stratified_sample(split, cfg.calibration_samples, cfg.seed).texts
    if len(data) < cfg.batch_size:
        raise BuildError(f"prune: only {len(data)} calibration texts in {cfg.dataset}; need at least one batch "
                         f"of {cfg.batch_size}")
    for start in range(0, len(data) - cfg.batch_size + 1, cfg.batch_size):
        texts = data[start:start + cfg.batch_size]
        yield ctx.tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_seq_len, return_tensors="pt")


def _loss(model: nn.Module, batch, head_mask, reference_out) -> torch.Tensor:
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), head_mask=head_mask)
    if isinstance(model, ClassificationModel):
        return nn.functional.cross_entropy(out, out.detach().argmax(dim=-1))
    student = nn.functional.normalize(out, dim=-1)
    teacher = nn.functional.normalize(reference_out, dim=-1)
    logits = student @ teacher.T / 0.05
    return nn.functional.cross_entropy(logits, torch.arange(len(logits)))


def importance(model: nn.Module, cfg: PruneConfig, ctx: BuildContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer-normalized importance of every head [L, H] and FFN neuron [L, F]."""
    config = encoder_config(model)
    layers = list(encoder_layers(model, "prune"))
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    head_mask = torch.ones(n_layers, n_heads, requires_grad=True)
    ffn_masks = [torch.ones(l.intermediate.dense.out_features, requires_grad=True) for l in layers]
    hooks = [l.intermediate.register_forward_hook(lambda _m, _i, out, mask=mask: out * mask)
             for l, mask in zip(layers, ffn_masks)]
    head_score = torch.zeros(n_layers, n_heads)
    ffn_score = [torch.zeros_like(m) for m in ffn_masks]
    was_training = model.training
    model.eval()
    try:
        for batch in _calibration_batches(cfg, ctx):
            with torch.no_grad():
                reference_out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            loss = _loss(model, batch, head_mask, reference_out)
            if not torch.isfinite(loss):
                raise BuildError("prune: the importance loss is not finite; check the calibration data")
            head_grad, *ffn_grads = torch.autograd.grad(loss, [head_mask, *ffn_masks])
            head_score += head_grad.abs()
            for score, grad in zip(ffn_score, ffn_grads):
                score += grad.abs()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    head_score = head_score / head_score.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    ffn = torch.stack([s / s.norm().clamp(min=1e-12) for s in ffn_score])
    return head_score, ffn


def _choose_heads(scores: torch.Tensor, keep: int, uniform: bool) -> dict[int, list[int]]:
    """Heads to remove per layer: the least important, uniformly or ranked across layers."""
    n_layers, n_heads = scores.shape
    if uniform:
        order = scores.argsort(dim=-1)  # ascending importance
        return {l: sorted(order[l, : n_heads - keep].tolist()) for l in range(n_layers) if keep < n_heads}
    total_remove = n_layers * (n_heads - keep)
    removed: dict[int, list[int]] = {}
    # Globally least important first; never the last head of a layer.
    for flat in scores.flatten().argsort().tolist():
        if total_remove == 0:
            break
        layer, head = divmod(flat, n_heads)
        if len(removed.get(layer, [])) < n_heads - 1:
            removed.setdefault(layer, []).append(head)
            total_remove -= 1
    return {l: sorted(h) for l, h in removed.items()}


def _prune_ffn(layers: list[nn.Module], scores: torch.Tensor, keep: int) -> None:
    from transformers.pytorch_utils import prune_linear_layer

    for layer, score in zip(layers, scores):
        index = score.argsort(descending=True)[:keep].sort().values
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)


def run(cfg: PruneConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "torch" or art.module is None:
        raise BuildError(f"prune needs the PyTorch model: put it before export (got {art.kind})")
    model = art.module
    config = encoder_config(model)
    layers = list(encoder_layers(model, "prune"))
    heads, ffn = config.num_attention_heads, layers[0].intermediate.dense.out_features
    if config.pruned_heads:
        raise BuildError("prune: the model is already head-pruned; prune once, with the final targets")
    keep_heads, keep_ffn = plan_targets(cfg, heads, ffn)
    params_before = sum(p.numel() for p in model.parameters())

    head_scores, ffn_scores = importance(model, cfg, ctx)
    remove = _choose_heads(head_scores, keep_heads, cfg.uniform_heads)
    if remove:
        inner_model(model).prune_heads(remove)
    if keep_ffn < ffn:
        _prune_ffn(layers, ffn_scores, keep_ffn)
        config.intermediate_size = keep_ffn
    for p in model.parameters():
        p.requires_grad_(False)
    params_after = sum(p.numel() for p in model.parameters())
    details = {
        "heads_per_layer": {str(l): heads - len(remove.get(l, [])) for l in range(len(layers))},
        "ffn_dim": keep_ffn, "removed_heads": {str(l): h for l, h in remove.items()},
        "params_before": params_before, "params_after": params_after,
        "params_kept": round(params_after / params_before, 4), "calibration_samples": cfg.calibration_samples,
        "dataset": cfg.dataset,
    }
    return Artifact(kind="torch", precision=art.precision, module=model), details


def expected_params_removed(hidden: int, head_dim: int, heads_removed: int, ffn_removed: int, layers: int) -> int:
    """What pruning must remove: per head 3 x (hidden x head_dim + head_dim) in Q, K, V and
    head_dim x hidden in the output projection; per FFN neuron hidden + 1 in and hidden out."""
    per_head = 3 * (hidden * head_dim + head_dim) + head_dim * hidden
    per_neuron = hidden + 1 + hidden
    return heads_removed * per_head + layers * ffn_removed * per_neuron

