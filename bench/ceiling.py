"""In-process ceiling: the same variant's ONNX graph and tokenizer, no HTTP, length-sorted batches."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.workloads import load_manifest, load_tokenizer
from service.backends.onnx import session_options
from service.tokenization import pad_token_id


class Ceiling:
    def __init__(self, store: Path, model: str, threads: int | None = None, batch_size: int = 32):
        import onnxruntime as ort

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
        # The same session options as the server's ONNX backend.
        self.session = ort.InferenceSession(str(path / manifest["model_file"]), session_options(self.threads),
                                            providers=["CPUExecutionProvider"])
        self.model_file = str(path / manifest["model_file"])

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encs = self.tok.encode_batch(texts, add_special_tokens=True)
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return self.session.run([self.output_name], {n: arrays[n] for n in self.input_names})[0]

    def _pass(self, texts: list[str], order: list[int]) -> tuple[float, int]:
        batches = [[texts[i] for i in order[k:k + self.batch_size]] for k in range(0, len(order), self.batch_size)]
        self._embed_batch(batches[len(batches) // 2])  # warm-up, not counted
        began = time.perf_counter()
        for batch in batches:
            self._embed_batch(batch)
        return time.perf_counter() - began, len(batches)

    def measure_sorted(self, texts: list[str], lengths: list[int]) -> dict:
        """One length-sorted pass over the pool: texts/s right now.

        Taken next to each server cell, so that the cell's share of the ceiling compares two numbers
        measured seconds apart: these shared machines drift by tens of percent within minutes. A whole
        pass, because any part of the sorted pool would be biased towards short or long texts.
        """
        elapsed, _ = self._pass(texts, sorted(range(len(texts)), key=lambda i: lengths[i]))
        return {"ok": True, "texts": len(texts), "elapsed_s": elapsed, "texts_per_s": len(texts) / elapsed}

    def measure(self, texts: list[str], lengths: list[int]) -> dict:
        """Tokenize + infer every text once in length-sorted batches (padded per batch): texts/s.

        A second pass in pool order (batches of the same size, no sorting) shows what padding costs.
        """
        by_length = sorted(range(len(texts)), key=lambda i: lengths[i])
        elapsed, batches = self._pass(texts, by_length)
        unsorted_elapsed, _ = self._pass(texts, list(range(len(texts))))

        def padded_tokens(order: list[int]) -> int:
            return sum(max(lengths[i] for i in order[k:k + self.batch_size]) * len(order[k:k + self.batch_size])
                       for k in range(0, len(order), self.batch_size))

        return {"ok": True, "texts": len(texts), "batches": batches, "batch_size": self.batch_size,
                "elapsed_s": elapsed, "texts_per_s": len(texts) / elapsed, "threads": self.threads,
                "real_tokens": sum(lengths), "padded_tokens_sorted": padded_tokens(by_length),
                "unsorted_elapsed_s": unsorted_elapsed, "texts_per_s_unsorted": len(texts) / unsorted_elapsed,
                "padded_tokens_unsorted": padded_tokens(list(range(len(texts)))),
                "model_file": self.model_file}
