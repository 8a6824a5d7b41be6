"""Fast tokenization (Hugging Face `tokenizers`, no torch), truncation and token-id validation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import orjson
from tokenizers import Tokenizer

from service.errors import InvalidInput, PayloadTooLarge, shown

Direction = Literal["right", "left"]


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # int64 [T], special tokens included
    type_ids: np.ndarray  # int64 [T]
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def pad_token_id(tok: Tokenizer, tokenizer_dir: Path) -> int:
    """The pad token's id from ``tokenizer_config.json`` (0 when none is named)."""
    cfg_file = tokenizer_dir / "tokenizer_config.json"
    token = None
    if cfg_file.is_file():
        token = json.loads(cfg_file.read_text()).get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
    pad = tok.token_to_id(token) if isinstance(token, str) else None
    return int(pad) if pad is not None else 0


class TextTokenizer:
    """Turns texts or raw token ids into model inputs of at most ``max_seq_len`` tokens."""

    def __init__(self, tokenizer_dir: Path, max_seq_len: int):
        path = Path(tokenizer_dir) / "tokenizer.json"
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_seq_len = max_seq_len
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = self._tok.num_special_tokens_to_add(is_pair=False)
        empty = self._tok.encode("", add_special_tokens=True)
        # Single-sequence template: the first special token before the text, the rest after it.
        self._prefix = list(empty.ids[:1]) if self._special else []
        self._suffix = list(empty.ids[1:]) if self._special else []
        self.pad_id = pad_token_id(self._tok, Path(tokenizer_dir))

    def encode_texts(self, texts: Sequence[str], truncate: bool, direction: Direction = "right",
                     field: str = "input") -> list[Encoded]:
        raw = self._tok.encode_batch(list(texts), add_special_tokens=False)
        limit = self.max_seq_len - self._special
        out = []
        for i, enc in enumerate(raw):
            cut = len(enc.ids) > limit
            if cut:
                if not truncate:
                    raise InvalidInput(
                        f"{field}[{i}] has {len(enc.ids) + self._special} tokens, more than the model's "
                        f"max_seq_len of {self.max_seq_len}; shorten it or ask for truncation"
                    )
                enc.truncate(limit, direction=direction)
            done = self._tok.post_process(enc, None, add_special_tokens=True)
            out.append(Encoded(np.asarray(done.ids, dtype=np.int64), np.asarray(done.type_ids, dtype=np.int64), cut))
        return out

    def encode_ids(self, sequences: Sequence[Sequence[int]], truncate: bool, direction: Direction = "right",
                   field: str = "input") -> list[Encoded]:
        """Raw token ids of this model's vocabulary; special tokens are added unless already present."""
        out = []
        for i, seq in enumerate(sequences):
            ids = [int(t) for t in seq]
            if not ids:
                raise InvalidInput(f"{field}[{i}] is an empty list of token ids")
            bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
            if bad is not None:
                raise InvalidInput(f"{field}[{i}] has token id {shown(bad)}, outside this model's vocabulary "
                                   f"of {self.vocab_size} ids")
            has_specials = bool(self._prefix) and ids[: len(self._prefix)] == self._prefix and \
                ids[len(ids) - len(self._suffix):] == self._suffix
            body = ids[len(self._prefix): len(ids) - len(self._suffix)] if has_specials else ids
            limit = self.max_seq_len - self._special
            cut = len(body) > limit
            if cut:
                if not truncate:
                    raise InvalidInput(f"{field}[{i}] has {len(body) + self._special} tokens, more than the "
                                       f"model's max_seq_len of {self.max_seq_len}")
                body = body[:limit] if direction == "right" else body[-limit:]
            full = self._prefix + body + self._suffix
            out.append(Encoded(np.asarray(full, dtype=np.int64), np.zeros(len(full), dtype=np.int64), cut))
        return out

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True, compact: bool = False,
                 max_tokens: int | None = None, field: str = "inputs") -> bytes:
        """/tokenize's answer as JSON bytes, built where it is called (the tokenizer pool for a large
        request). TEI's form: per text, every token as {id, text, special, start, stop}. The compact
        form: per text, {ids, tokens, offsets, special} as parallel lists, which orjson writes straight
        from the tokenizer's own lists, with no Python object per token. Raises PayloadTooLarge past
        ``max_tokens`` in all, before building anything."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        total = sum(len(enc) for enc in encodings)
        if max_tokens is not None:
            check_token_total(total, max_tokens, field)
        if compact:
            return orjson.dumps([{"ids": enc.ids, "tokens": enc.tokens, "offsets": enc.offsets,
                                  "special": enc.special_tokens_mask} for enc in encodings])
        result = []
        for enc in encodings:
            result.append([{"id": tid, "text": tok, "special": bool(special),
                            "start": None if special else start, "stop": None if special else stop}
                           for tid, tok, (start, stop), special
                           in zip(enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask)])
        return orjson.dumps(result)


def check_token_total(total: int, limit: int, field: str) -> None:
    """The per-request cap on tokens (after truncation): bounds the work and the answer of one request."""
    if total > limit:
        raise PayloadTooLarge(f"{field} has {total} tokens in all; at most {limit} per request "
                              f"(BERTSERVE_MAX_TOKENS_PER_REQUEST)")


def pad_batch(items: Sequence[Encoded], input_names: Sequence[str], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest item: int64 [B, T] arrays for the backend."""
    width = max(len(e) for e in items)
    ids = np.full((len(items), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), width), dtype=np.int64)
    types = np.zeros((len(items), width), dtype=np.int64)
    for row, enc in enumerate(items):
        n = len(enc)
        ids[row, :n] = enc.ids
        mask[row, :n] = 1
        types[row, :n] = enc.type_ids
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: arrays[name] for name in input_names}
