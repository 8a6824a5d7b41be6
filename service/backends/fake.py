"""A deterministic backend for API tests: no model file, no torch, outputs derived from the token ids.

Each row depends only on that row's unpadded ids, so a test can check that batching with others of
different lengths never changes an answer.
"""

from __future__ import annotations

import threading

import numpy as np

from service.backends.base import BackendInfo


class FakeBackend:
    def __init__(self, dim: int = 8, task: str = "embedding", num_labels: int = 3, normalize: bool = True,
                 fail_when_token: int | None = None, delay_s: float = 0.0, salt: int = 0,
                 hold: threading.Event | None = None, per_token_s: float = 0.0):
        self.dim, self.task, self.num_labels, self.normalize = dim, task, num_labels, normalize
        self.salt = salt  # mixed into every row: two fake "versions" of a model answer differently
        self.fail_when_token = fail_when_token  # raise for any batch containing this id (fault tests)
        self.delay_s = delay_s  # simulated inference time, for queueing and timeout tests
        self.per_token_s = per_token_s  # and per padded token: a model of fixed speed, for admission tests
        # A hung backend, for watchdog and deadline tests: every batch waits until the event is set.
        self.hold = hold
        self.entered = threading.Event()  # set when a batch first reaches infer()
        self.batches: list[tuple[int, int]] = []  # (batch size, padded length) of every call
        self.seen_ids: list[list[int]] = []  # every row that reached inference, unpadded
        self._lock = threading.Lock()
        self.closed = False
        out = "sentence_embedding" if task == "embedding" else "logits"
        self.info = BackendInfo(format="fake", precision="fp32", provider="cpu", output_name=out)

    def warmup(self) -> None:
        pass

    def row(self, ids: np.ndarray) -> np.ndarray:
        width = self.dim if self.task == "embedding" else self.num_labels
        rng = np.random.default_rng((int(np.sum(ids * np.arange(1, len(ids) + 1))) + self.salt) % (2**32))
        vec = rng.standard_normal(width).astype(np.float32) + len(ids) / 10
        if self.task == "embedding" and self.normalize:
            vec /= np.linalg.norm(vec)
        return vec

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self._lock:
            self.batches.append(ids.shape)
            self.seen_ids.extend(ids[i][mask[i].astype(bool)].tolist() for i in range(ids.shape[0]))
        self.entered.set()
        if self.hold is not None:
            self.hold.wait()
        if self.delay_s or self.per_token_s:
            import time

            time.sleep(self.delay_s + self.per_token_s * ids.size)
        if self.fail_when_token is not None and (ids == self.fail_when_token).any():
            raise RuntimeError("fake backend failure: secret internal detail")
        rows = [self.row(ids[i][mask[i].astype(bool)]) for i in range(ids.shape[0])]
        return {self.info.output_name: np.stack(rows)}

    def close(self) -> None:
        self.closed = True
