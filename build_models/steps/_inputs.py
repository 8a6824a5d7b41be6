"""Tokenized example batches the export steps use to trace and to check their output."""

from __future__ import annotations

import torch


def example_batch(ctx, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = ctx.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: enc[name] for name in ctx.tokenizer.model_input_names if name in enc}


def check_batches(ctx) -> list[dict[str, torch.Tensor]]:
    """Shapes unlike the tracing shapes: one item, mixed lengths with padding, and the longest allowed."""
    texts = ctx.sample_texts
    long_text = " ".join(texts)  # long enough to hit max_seq_len after truncation
    return [
        example_batch(ctx, texts[:1], ctx.max_seq_len),
        example_batch(ctx, [texts[2][:40], texts[3], texts[4][:10]], ctx.max_seq_len),
        example_batch(ctx, [long_text, texts[5][:25]], ctx.max_seq_len),
    ]


def ordered(batch: dict[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, ...]:
    # The wrapper modules take (input_ids, attention_mask, token_type_ids) positionally.
    return tuple(batch[n] for n in names)


def input_order(ctx) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in ctx.tokenizer.model_input_names:
        names.append("token_type_ids")
    return names
