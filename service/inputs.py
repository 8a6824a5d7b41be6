"""A request's inputs as every API translates them, what may be done with them, and the limits on them.

Routes turn their API's body into ``Inputs`` (texts, or token-id sequences) and ``InferOptions``; the
model entry checks them against the settings here, before any work is spent on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from service.errors import InvalidInput, PayloadTooLarge
from service.long_input import Direction, Policy
from service.settings import ServiceSettings


@dataclass(frozen=True, slots=True)
class Inputs:
    """Texts or token-id sequences (exactly one of the two); ``field`` names them in error messages."""

    texts: Sequence[str] | None = None
    ids: Sequence[Sequence[int]] | None = None
    field: str = "input"

    @classmethod
    def of_texts(cls, texts: Sequence[str], field: str = "input") -> "Inputs":
        return cls(texts=texts, field=field)

    @classmethod
    def of_ids(cls, ids: Sequence[Sequence[int]], field: str = "input") -> "Inputs":
        return cls(ids=ids, field=field)

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)

    @property
    def size(self) -> int:
        """Characters or token ids in all: what decides whether the work is done off the event loop."""
        return sum(len(x) for x in (self.texts if self.texts is not None else self.ids))


@dataclass(frozen=True, slots=True)
class InferOptions:
    """What a request asks for beyond its inputs; None leaves it to the model's manifest, then the settings."""

    long_input: Policy | None = None  # error | truncate | window (service/long_input.py)
    # TEI's and KServe's `truncate` flag: true is long_input "truncate", false is "error"; long_input wins.
    truncate: bool | None = None
    direction: Direction = "right"  # which end truncation cuts
    prompt_name: str | None = None  # a sentence-transformers prompt of the model, put before each text

    @property
    def policy(self) -> Policy | None:
        if self.long_input is not None:
            return self.long_input
        return None if self.truncate is None else ("truncate" if self.truncate else "error")


def check(inputs: Inputs, settings: ServiceSettings) -> None:
    """The per-request limits: InvalidInput or PayloadTooLarge naming the input at fault."""
    items = inputs.texts if inputs.texts is not None else inputs.ids
    field = inputs.field
    if len(items) == 0:
        raise InvalidInput(f"{field} is empty: send at least one {'text' if inputs.texts is not None else 'input'}")
    limit = settings.max_inputs_per_request
    if len(items) > limit:
        raise PayloadTooLarge(f"{field} has {len(items)} items; at most {limit} per request")
    if inputs.texts is None:
        return  # token ids are checked against the vocabulary by the tokenizer
    for i, text in enumerate(inputs.texts):
        if not text.strip():
            raise InvalidInput(f"{field}[{i}] is an empty string; every input must contain text")
        if len(text) > settings.max_chars_per_text:
            raise PayloadTooLarge(f"{field}[{i}] has {len(text)} characters; at most {settings.max_chars_per_text}")
        at = unpaired_surrogate(text)
        if at is not None:  # no tokenizer takes it (a TypeError out of it), and no answer could quote it
            raise InvalidInput(f"{field}[{i}] holds an unpaired UTF-16 surrogate at character {at}; "
                               f"texts must be valid Unicode")


def unpaired_surrogate(text: str) -> int | None:
    """Where ``text`` holds half a UTF-16 pair (JSON's "\\ud800" escape decodes to one), which UTF-8
    cannot encode; None when it is valid Unicode."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None
