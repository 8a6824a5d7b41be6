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


def training_corpus(step: str, cfg, exclude: frozenset[str] = frozenset()) -> tuple[list[str], list[str], dict]:
    """The texts (and labels, '' for a mix) a training step with ``cfg.dataset`` reads, and what to
    record: one corpus's train split, or a mix of every named source. ``exclude``: the evaluation's
    texts, normalized (build_models/corpora.py normalized); none of them is trained on."""
    from build_models.corpora import load_split, mixed_texts, normalized

    if isinstance(cfg.dataset, list):
        mix = mixed_texts(cfg.dataset, cfg.samples, cfg.seed, exclude, cfg.passage_words)
        if len(mix.texts) < cfg.batch_size:
            raise BuildError(f"{step}: {len(mix.texts)} training texts in the mix {cfg.dataset}; "
                             f"need at least one batch of {cfg.batch_size}")
        details = {"mix": {"sources": list(cfg.dataset), "per_source": mix.per_source,
                           "available": mix.available, "passage_words": cfg.passage_words,
                           "evaluation_texts_excluded": mix.excluded}}
        return mix.texts, [""] * len(mix.texts), details
    data = load_split(cfg.dataset, "train")
    pairs = [(t, l) for t, l in zip(data.texts, data.labels) if t.strip()]
    kept = [(t, l) for t, l in pairs if normalized(t) not in exclude]
    dropped, pairs = len(pairs) - len(kept), kept
    random.Random(cfg.seed).shuffle(pairs)
    pairs = pairs[:cfg.samples]
    if len(pairs) < cfg.batch_size:
        raise BuildError(f"{step}: {len(pairs)} training texts in {cfg.dataset}; need at least one batch of "
                         f"{cfg.batch_size}")
    return [t for t, _ in pairs], [l for _, l in pairs], {"evaluation_texts_excluded": dropped}
