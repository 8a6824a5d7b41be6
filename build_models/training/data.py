"""Training text for distill and finetune: real text from a bundled corpus's train split only."""

from __future__ import annotations

import random

from build_models.errors import BuildError


def training_texts(step: str, dataset: str, samples: int | None, seed: int, batch_size: int
                   ) -> tuple[list[str], list[str]]:
    """Up to ``samples`` shuffled (text, label) pairs from the train split, checked to fill a batch."""
    from build_models.corpora import load_split

    data = load_split(dataset, "train")
    pairs = [(t, l) for t, l in zip(data.texts, data.labels) if t.strip()]
    random.Random(seed).shuffle(pairs)
    if samples is not None:
        pairs = pairs[:samples]
    if len(pairs) < batch_size:
        raise BuildError(f"{step}: {len(pairs)} training texts in {dataset}; need at least one batch of {batch_size}")
    return [t for t, _ in pairs], [l for _, l in pairs]


def tokenize_rows(tokenizer, texts: list[str], rows: list[int], max_seq_len: int, device):
    """The texts at ``rows`` as one padded batch (to its longest text) on ``device``."""
    return tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_seq_len,
                     return_tensors="pt").to(device)
