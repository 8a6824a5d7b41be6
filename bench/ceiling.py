"""In-process ceiling: the same variant's ONNX graph and tokenizer, no HTTP, length-sorted batches, in the
best arrangement of sessions and threads for the workload."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.workloads import load_manifest, load_tokenizer
from service.backends.onnx import session_options
from service.tokenization import pad_token_id


class Arrangement:
    """How the ceiling uses the cores: ``sessions`` sessions of ``threads`` intra-op threads each, every
    session in its own Python thread taking the next batch from a shared list (one session: no threads)."""

    def __init__(self, model_file: str, sessions: int, threads: int):
        import onnxruntime as ort

        self.threads = threads
        self.name = (f"one session, {threads} threads" if sessions == 1
                     else f"{sessions} sessions, {threads} thread{'s' if threads > 1 else ''} each")
        # The same session options as the server's ONNX backend.
        self.sessions = [ort.InferenceSession(model_file, session_options(threads),
                                              providers=["CPUExecutionProvider"]) for _ in range(sessions)]

    def run(self, batches: list, embed) -> None:
        """``embed(session, batch)`` for every batch, spread over the sessions."""
        if len(self.sessions) == 1:
            for batch in batches:
                embed(self.sessions[0], batch)
            return
        taken = itertools.count()  # next() on a count is atomic under the GIL

        def drain(session) -> None:
            while (k := next(taken)) < len(batches):
                embed(session, batches[k])

        threads = [threading.Thread(target=drain, args=(s,)) for s in self.sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


class Ceiling:
    """The best in-process arrangement of the variant's ONNX graph on this machine, so that "of
    ceiling" never flatters: one session with every core's thread, or one single-threaded session per
    core, whichever is faster for the workload (``measure`` times both and keeps the winner)."""

    def __init__(self, store: Path, model: str, threads: int | None = None, batch_size: int = 32):
        path, manifest = load_manifest(store, model)
        if manifest.get("format") != "onnx":
            raise ValueError(f"{model!r} is {manifest.get('format')}, the ceiling needs an ONNX variant")
        self.threads = threads or os.cpu_count() or 1
        self.batch_size = batch_size
        self.max_seq_len = int(manifest["max_seq_len"])
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.output_name = manifest["outputs"][0]["name"]
        self.tok = load_tokenizer(path, manifest)
        self.tok.enable_truncation(self.max_seq_len)
        self.pad_id = pad_token_id(self.tok, path / manifest.get("tokenizer_dir", "tokenizer"))
        self.model_file = str(path / manifest["model_file"])
        self.arrangements = [Arrangement(self.model_file, 1, self.threads)]
        if self.threads > 1:
            self.arrangements.append(Arrangement(self.model_file, self.threads, 1))

    def _embed_batch(self, session, texts: list[str]) -> np.ndarray:
        encs = self.tok.encode_batch(texts, add_special_tokens=True)
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return session.run([self.output_name], {n: arrays[n] for n in self.input_names})[0]

    def _pass(self, texts: list[str], order: list[int], arrangement: Arrangement) -> tuple[float, int]:
        batches = [[texts[i] for i in order[k:k + self.batch_size]] for k in range(0, len(order), self.batch_size)]
        for session in arrangement.sessions:  # warm-up, not counted
            self._embed_batch(session, batches[len(batches) // 2])
        began = time.perf_counter()
        arrangement.run(batches, self._embed_batch)
        return time.perf_counter() - began, len(batches)

    def _arrangement(self, name: str | None) -> Arrangement:
        return next((a for a in self.arrangements if a.name == name), self.arrangements[0])

    def measure_sorted(self, texts: list[str], lengths: list[int], arrangement: str | None = None) -> dict:
        """One length-sorted pass over the pool in ``arrangement`` (the winner ``measure`` reported):
        texts/s right now.

        Taken next to each server cell, so that the cell's share of the ceiling compares two numbers
        measured seconds apart: these shared machines drift by tens of percent within minutes. A whole
        pass, because any part of the sorted pool would be biased towards short or long texts.
        """
        elapsed, _ = self._pass(texts, sorted(range(len(texts)), key=lambda i: lengths[i]),
                                self._arrangement(arrangement))
        return {"ok": True, "texts": len(texts), "elapsed_s": elapsed, "texts_per_s": len(texts) / elapsed}

    def measure(self, texts: list[str], lengths: list[int]) -> dict:
        """Tokenize + infer every text once in length-sorted batches (padded per batch) in each
        arrangement, alternating them twice and keeping each one's better pass: the fastest is the ceiling.

        A last pass in pool order with the winner (batches of the same size, no sorting) shows what
        padding costs.
        """
        by_length = sorted(range(len(texts)), key=lambda i: lengths[i])
        best: dict[str, float] = {}
        batches = 0
        for _ in range(2):
            for arrangement in self.arrangements:
                elapsed, batches = self._pass(texts, by_length, arrangement)
                best[arrangement.name] = min(elapsed, best.get(arrangement.name, float("inf")))
        winner = min(best, key=best.get)
        elapsed = best[winner]
        unsorted_elapsed, _ = self._pass(texts, list(range(len(texts))), self._arrangement(winner))

        def padded_tokens(order: list[int]) -> int:
            return sum(max(lengths[i] for i in order[k:k + self.batch_size]) * len(order[k:k + self.batch_size])
                       for k in range(0, len(order), self.batch_size))

        return {"ok": True, "texts": len(texts), "batches": batches, "batch_size": self.batch_size,
                "elapsed_s": elapsed, "texts_per_s": len(texts) / elapsed, "threads": self.threads,
                "arrangement": winner,
                "arrangements": {name: len(texts) / seconds for name, seconds in best.items()},
                "real_tokens": sum(lengths), "padded_tokens_sorted": padded_tokens(by_length),
                "unsorted_elapsed_s": unsorted_elapsed, "texts_per_s_unsorted": len(texts) / unsorted_elapsed,
                "padded_tokens_unsorted": padded_tokens(list(range(len(texts)))),
                "model_file": self.model_file}
