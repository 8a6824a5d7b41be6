"""The glue between a batch of queued items and a backend: pad the batch's token ids into the
backend's int64 arrays, run it, and give back one output row per item."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.backends.base import Backend
from service.batching.policy import WorkItem
from service.tokenization import pad_batch


def row_infer_fn(backend: Backend, input_names: Sequence[str], pad_id: int):
    """The batcher's infer fn for ``backend``: items whose payloads are ``Encoded`` -> output rows."""
    output = backend.info.output_name

    def infer(items: list[WorkItem]) -> list[np.ndarray]:
        batch = pad_batch([item.payload for item in items], input_names, pad_id)
        return list(backend.infer(batch)[output])

    return infer
