"""Fast tokenization (Hugging Face `tokenizers`, no torch): special tokens and prompts, inputs longer than
the model refused, cut or split into windows (service/long_input.py), token-id validation, padding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import orjson
from tokenizers import Tokenizer

from service.errors import InvalidInput, PayloadTooLarge, shown
from service.long_input import Direction, Layout, LongInput, new_tokens, window_count, window_spans


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # int64 [T], special tokens included
    type_ids: np.ndarray  # int64 [T]
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, slots=True)
class Encoding:
    """A request's model inputs: ``items`` go to the batcher in order; ``layout`` says which belong to
    which input when some input was split into windows (None: one item per input)."""

    items: list[Encoded]
    layout: Layout | None = None

    def combine(self, rows: np.ndarray, normalize: bool) -> np.ndarray:
        """One output row per input from one row per item."""
        return rows if self.layout is None else self.layout.combine(rows, normalize)


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

    def encode(self, texts: Sequence[str], rule: LongInput, field: str = "input",
               prompt: str | None = None) -> Encoding:
        """Texts as model inputs under ``rule`` (service/long_input.py). ``prompt``: a
        sentence-transformers prompt put before every text (and in every window of it); its tokens
        count toward the length limit."""
        raw = self._tok.encode_batch(list(texts), add_special_tokens=False)
        lead = self._tok.encode(prompt, add_special_tokens=False).ids if prompt else []
        room = self.max_seq_len - self._special - len(lead)
        if room < 1:
            raise InvalidInput(f"the prompt takes {len(lead)} tokens, leaving no room for text in the model's "
                               f"max_seq_len of {self.max_seq_len}")
        return self._assemble([enc.ids for enc in raw], rule, field, lead, room)

    def encode_token_ids(self, sequences: Sequence[Sequence[int]], rule: LongInput,
                         field: str = "input") -> Encoding:
        """Raw token ids of this model's vocabulary under ``rule``; special tokens are added unless
        already present at both ends."""
        bodies = []
        for i, seq in enumerate(sequences):
            ids = [int(t) for t in seq]
            check_token_ids(ids, self.vocab_size, f"{field}[{i}]")
            has_specials = bool(self._prefix) and ids[: len(self._prefix)] == self._prefix and \
                ids[len(ids) - len(self._suffix):] == self._suffix
            bodies.append(ids[len(self._prefix): len(ids) - len(self._suffix)] if has_specials else ids)
        return self._assemble(bodies, rule, field, [], self.max_seq_len - self._special)

    def _assemble(self, bodies: list[list[int]], rule: LongInput, field: str, lead: list[int],
                  room: int) -> Encoding:
        """Special tokens (and the prompt's) around each body of at most ``room`` tokens; longer ones
        refused, cut or split into windows by ``rule``."""
        items: list[Encoded] = []
        counts: list[int] = []
        weights: list[int] = []
        windowed = False
        for i, body in enumerate(bodies):
            if len(body) <= room:
                items.append(self._item(lead + body, False))
                counts.append(1)
                weights.append(len(body))
                continue
            if rule.policy == "error":
                raise InvalidInput(
                    f"{field}[{i}] has {len(body) + len(lead) + self._special} tokens, more than the model's "
                    f"max_seq_len of {self.max_seq_len}; shorten it, or ask for truncation or windows "
                    f"(long_input: truncate or window)")
            if rule.policy == "truncate":
                items.append(self._item(lead + (body[:room] if rule.direction == "right" else body[-room:]), True))
                counts.append(1)
                weights.append(room)
                continue
            needed = window_count(len(body), room, rule.overlap)
            if needed > rule.max_windows:
                raise PayloadTooLarge(
                    f"{field}[{i}] has {len(body) + len(lead) + self._special} tokens, {needed} windows of "
                    f"{self.max_seq_len}; at most {rule.max_windows} windows per input "
                    f"(BERTSERVE_MAX_WINDOWS_PER_INPUT)")
            spans = window_spans(len(body), room, rule.overlap)
            items.extend(self._item(lead + body[start:end], False) for start, end in spans)
            counts.append(len(spans))
            weights.extend(new_tokens(spans))
            windowed = True
        layout = Layout(counts, np.asarray(weights, dtype=np.float64)) if windowed else None
        return Encoding(items, layout)

    def _item(self, body: list[int], truncated: bool) -> Encoded:
        full = self._prefix + body + self._suffix
        return Encoded(np.asarray(full, dtype=np.int64), np.zeros(len(full), dtype=np.int64), truncated)

    def encode_texts(self, texts: Sequence[str], truncate: bool, direction: Direction = "right",
                     field: str = "input") -> list[Encoded]:
        """One model input per text, refused or cut when longer than ``max_seq_len``."""
        return self.encode(texts, LongInput("truncate" if truncate else "error", direction), field).items

    def encode_ids(self, sequences: Sequence[Sequence[int]], truncate: bool, direction: Direction = "right",
                   field: str = "input") -> list[Encoded]:
        """One model input per token-id sequence, refused or cut when longer than ``max_seq_len``."""
        return self.encode_token_ids(sequences, LongInput("truncate" if truncate else "error", direction),
                                     field).items

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

    def decode(self, sequences: Sequence[list], skip_special_tokens: bool = True, field: str = "ids",
               single: bool = False) -> list[str]:
        """Token-id sequences back to text, one string per sequence (TEI's /decode). Every id is a
        client's: each is checked against the vocabulary first (``check_token_ids``), so the tokenizer
        only ever sees ids it holds. ``single``: the one sequence was sent bare, so positions are named
        ``ids[j]``, not ``ids[0][j]``."""
        for i, seq in enumerate(sequences):
            check_token_ids(seq, self.vocab_size, field if single else f"{field}[{i}]")
        return self._tok.decode_batch([list(seq) for seq in sequences], skip_special_tokens=skip_special_tokens)


def check_token_total(total: int, limit: int, field: str) -> None:
    """The per-request cap on tokens (after truncation): bounds the work and the answer of one request."""
    if total > limit:
        raise PayloadTooLarge(f"{field} has {total} tokens in all; at most {limit} per request "
                              f"(BERTSERVE_MAX_TOKENS_PER_REQUEST)")


def check_token_ids(ids: Sequence, vocab_size: int, where: str) -> None:
    """A client's token ids, every one hostile: InvalidInput unless ``ids`` is a non-empty list of
    integers (not booleans, not floats) from 0 to ``vocab_size`` - 1, naming the first bad one's
    position as ``where[j]``."""
    if len(ids) == 0:
        raise InvalidInput(f"{where} is an empty list of token ids")
    # One pass in C over a valid sequence (the common case); the slow walk only names the culprit.
    if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab_size:
        return
    for j, value in enumerate(ids):
        if type(value) is not int:
            # JSON's names, not Python's reprs
            what = str(value).lower() if isinstance(value, bool) else "null" if value is None else shown(value)
            raise InvalidInput(f"{where}[{j}] is {what}, not a token id: token ids are integers "
                               f"from 0 to {vocab_size - 1}")
        if not 0 <= value < vocab_size:
            raise InvalidInput(f"{where}[{j}] is token id {shown(value)}, outside this model's vocabulary "
                               f"of {vocab_size} ids")


def id_total(sequences: Sequence, field: str) -> int:
    """Token ids in all of ``sequences``, each of which must be a list (a client may send a mix of ids
    and lists): what the per-request token cap counts before any id is looked at."""
    total = 0
    for i, seq in enumerate(sequences):
        if not isinstance(seq, list):
            raise InvalidInput(f"{field}[{i}] is {shown(seq)}, not a list of token ids: send one list of ids "
                               f"or a list of lists of ids")
        total += len(seq)
    return total


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
