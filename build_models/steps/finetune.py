"""Fine-tune the source checkpoint into a text classifier on a bundled labelled corpus.

For users with an encoder but no classifier yet: a classification head on the source (BERT's pooled
[CLS] output), trained with cross-entropy on the corpus's train split (Reuters R8, say, or the
election tweets' authors), never its test split. The result becomes the recipe's teacher: the fp32
reference that variants are distilled from and measured against. Same loop, checkpoints and
strategies as distill.
"""

from __future__ import annotations

import torch
from torch import nn

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import ClassificationModel
from build_models.recipe import FinetuneConfig
from build_models.training.data import tokenize_rows, training_texts
from build_models.training.loop import StagedTask, checkpoint_key, train
from build_models.training.strategy import NOT_IN_RESULT, resolve_strategy


class FinetuneTask(StagedTask):
    """Cross-entropy on the corpus labels, in parts (loop.StagedTask): the target is the class ids."""

    def __init__(self, cfg: FinetuneConfig, tokenizer, texts: list[str], targets: list[int], device):
        self.cfg, self.tokenizer, self.texts, self.targets, self.device = cfg, tokenizer, texts, targets, device

    def inputs(self, rows: list[int]):
        return tokenize_rows(self.tokenizer, self.texts, rows, self.cfg.max_seq_len, self.device)

    def target(self, rows: list[int], inputs) -> torch.Tensor:
        return torch.tensor([self.targets[i] for i in rows], device=self.device)

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)


def run(cfg: FinetuneConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    from transformers import AutoModelForSequenceClassification

    if ctx.source is None:
        raise BuildError("finetune starts from the recipe's source checkpoint; none was given")
    world = ctx.world
    strategy = resolve_strategy(cfg.strategy, world, cfg.batch_size, "finetune",
                                layers=ctx.source.config.get("num_hidden_layers"),
                                micro_batches=cfg.micro_batches, schedule=cfg.pipeline_schedule)
    texts, labels = training_texts("finetune", cfg.dataset, cfg.samples, cfg.seed, cfg.batch_size)
    names = sorted(set(labels))
    if len(names) < 2:
        raise BuildError(f"finetune: {cfg.dataset} has {len(names)} label(s) in its train split; a classifier "
                         f"needs at least 2")
    label_of = {name: i for i, name in enumerate(names)}
    targets = [label_of[l] for l in labels]
    torch.manual_seed(cfg.seed)  # the new head starts the same on every rank and every run
    hf = AutoModelForSequenceClassification.from_pretrained(
        ctx.source.path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label_of,
        attn_implementation="eager")
    model = ClassificationModel(hf).to(world.device)
    for p in model.parameters():
        p.requires_grad_(True)
    checkpoint = None
    if ctx.checkpoint_dir is not None:
        key = checkpoint_key(cfg.model_dump(exclude=NOT_IN_RESULT), str(ctx.source.path), names)
        checkpoint = ctx.checkpoint_dir / f"finetune-{key}.pt"

    task = FinetuneTask(cfg, ctx.tokenizer, texts, targets, world.device)
    head = [p for n, p in hf.named_parameters() if n.startswith(("classifier.", "bert.pooler.", "pooler."))]
    outcome = train("finetune", cfg, model, model, len(texts), task, world, strategy, checkpoint,
                    fast_params=head, fast_learning_rate=cfg.head_learning_rate)
    model = model.cpu()
    counts = {name: labels.count(name) for name in names}
    details = {"dataset": cfg.dataset, "texts": len(texts), "labels": names, "examples_per_label": counts,
               **outcome.summary(), "params": sum(p.numel() for p in model.parameters())}
    return Artifact(kind="torch", precision="fp32", module=model), details
