"""Measure a variant against the fp32 PyTorch reference of the same source, on held-out real text.

Embedding task: per-sentence cosine to the reference (mean, min) and a downstream probe: a logistic
regression trained on the train split embedded by the variant itself, scored on the test split,
reported as retention = variant accuracy / reference accuracy; per-dimension ranges of the variant's
own train-split outputs (the manifest's calibration for int8/uint8 embeddings) and what float32, int8,
uint8 and binary vectors cost in probe retention and recall@10 (build_models/lowbit.py). Classification task: accuracy and
macro-F1 against the corpus labels (when they are the model's labels) and agreement with the
reference's predictions. Plus a latency probe: every variant of the build and the references timed
in alternating blocks in one session. Only the test split is used for scores; calibration and
distillation use the train split.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from build_models.corpora import LabelledText, load_split, stratified_sample
from build_models.recipe import EvaluationConfig, GatesConfig

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
BATCH = 32


class VariantUnavailable(Exception):
    """The variant cannot run on this machine (an fp16 graph without CUDA, say)."""


def default_threads(cfg: EvaluationConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


def torch_runner(module: torch.nn.Module, names: list[str]) -> Runner:
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(batch[n]) for n in names)).float().numpy()

    return run


def onnx_runner(path, names: list[str], threads: int, provider: str = "cpu") -> Runner:
    import onnxruntime as ort

    from service.backends.onnx import session_options

    opts = session_options(threads)
    providers = ["CPUExecutionProvider"]
    if provider == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
        raise VariantUnavailable(f"ONNX Runtime cannot load it with {providers}: {str(exc).splitlines()[0]}") from None

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, {n: batch[n] for n in names})[0].astype(np.float32)

    run.provider = session.get_providers()[0]  # where the numbers were actually measured
    try:
        return _smoke(run, names)
    except VariantUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VariantUnavailable(f"ONNX Runtime cannot run it with {providers}: {str(exc).splitlines()[0]}") from None


def _smoke(run: Runner, names: list[str]) -> Runner:
    probe = {n: np.ones((1, 4), dtype=np.int64) for n in names}
    if "token_type_ids" in probe:
        probe["token_type_ids"][:] = 0
    run(probe)
    return run


def torchscript_runner(path, names: list[str]) -> Runner:
    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return torch_runner(module, names)


def tokenize(tokenizer, texts: list[str], names: list[str], max_len: int, pad_to_max: bool = False):
    enc = tokenizer(texts, padding="max_length" if pad_to_max else True, truncation=True,
                    max_length=max_len, return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in names}


@dataclass
class Batches:
    """One split's texts tokenized once, in length-sorted batches, for every runner to encode.

    Length-sorted to keep padding small; ``order`` maps each batch row back to its text.
    """
    order: list[list[int]]
    inputs: list[dict[str, np.ndarray]]
    size: int


def batches(tokenizer, texts: list[str], names: list[str], max_len: int) -> Batches:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = [order[start : start + BATCH] for start in range(0, len(order), BATCH)]
    return Batches(order=chunks, inputs=[tokenize(tokenizer, [texts[i] for i in idx], names, max_len) for idx in chunks],
                   size=len(texts))


def progress_bar(total: int, desc: str, unit: str):
    """A tqdm bar with time left on stderr, drawn only when stderr is a terminal (not in logs)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def encode(run: Runner, split: Batches, bar=None) -> np.ndarray:
    """Outputs for every text of the split, in the texts' order."""
    out: list[np.ndarray | None] = [None] * split.size
    for idx, inputs in zip(split.order, split.inputs):
        for i, row in zip(idx, run(inputs)):
            out[i] = row
        if bar is not None:
            bar.update(len(idx))
    return np.stack(out)


def _probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == np.asarray(test_y)).mean())


def _knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10) -> float:
    """Share of test texts whose k nearest train texts by cosine vote for the right label (ties go to
    the label of the nearer text): how a vector database answers "which topic is this like"."""
    a = train_x / np.clip(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12, None)
    b = test_x / np.clip(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12, None)
    nearest = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :k]
    train_y = np.asarray(train_y)
    right = 0
    for row, gold in zip(nearest, test_y):
        votes: dict[str, float] = {}
        for rank, i in enumerate(row):
            votes[train_y[i]] = votes.get(train_y[i], 0.0) + 1.0 + 1e-3 * (k - rank)  # rank breaks ties
        right += max(votes, key=votes.get) == gold
    return right / len(test_y)


def evaluation_samples(cfg: EvaluationConfig) -> dict[str, LabelledText]:
    """The texts the evaluation scores and fits its probes on, by split name: "test" and "train" of
    ``cfg.dataset``, and "held_out_test" / "held_out_train" of the held-out corpus when there is one."""
    out = {"test": stratified_sample(load_split(cfg.dataset, "test"), cfg.probe_test_samples, cfg.seed + 1),
           "train": stratified_sample(load_split(cfg.dataset, "train"), cfg.probe_train_samples, cfg.seed)}
    if cfg.held_out is not None:
        h = cfg.held_out
        out["held_out_test"] = stratified_sample(load_split(h.dataset, "test"), h.probe_test_samples, cfg.seed + 1)
        out["held_out_train"] = stratified_sample(load_split(h.dataset, "train"), h.probe_train_samples, cfg.seed)
    return out


def evaluation_texts(cfg: EvaluationConfig) -> frozenset[str]:
    """Every text training must leave out, normalized: the probes' train samples and the whole test
    split of each evaluated corpus."""
    from build_models.corpora import normalized

    texts = [t for sample in evaluation_samples(cfg).values() for t in sample.texts]
    for dataset in [cfg.dataset] + ([cfg.held_out.dataset] if cfg.held_out else []):
        texts += load_split(dataset, "test").texts
    return frozenset(normalized(t) for t in texts)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return (a * b).sum(axis=1)


@dataclass
class QualityResult:
    metric: str
    value: float | None
    reference_value: float | None
    retention: float | None
    extra: dict[str, float | None] = field(default_factory=dict)
    ranges: dict | None = None  # embedding: manifest embedding_ranges, from the train split
    embedding_types: dict | None = None  # embedding: manifest quality.embedding_types
    held_out: dict | None = None  # embedding with evaluation.held_out: manifest quality.held_out


class Evaluator:
    """Holds the held-out data, tokenized once, and the reference's outputs, so each variant costs
    one pass. ``cache``: where the reference's outputs are kept between builds (reference_cache.py)."""

    def __init__(self, cfg: EvaluationConfig, task: str, tokenizer, names: list[str],
                 reference: torch.nn.Module, labels: list[str] | None,
                 default_reference: torch.nn.Module | None = None, cache=None, log=None):
        self.cfg, self.task, self.tokenizer, self.names = cfg, task, tokenizer, names
        self.labels = labels
        self.threads = default_threads(cfg)
        torch.set_num_threads(self.threads)
        self.samples = evaluation_samples(cfg)
        self.train: LabelledText = self.samples["train"]
        self.test: LabelledText = self.samples["test"]
        splits = {k: v for k, v in self.samples.items() if k == "test" or task == "embedding"}
        self.splits = {k: batches(tokenizer, v.texts, names, cfg.eval_max_seq_len) for k, v in splits.items()}
        self.reference_run = torch_runner(reference, names)
        # The same weights with transformers' default (SDPA) attention, timed only.
        self.default_reference_run = torch_runner(default_reference, names) if default_reference else None
        self.reference_cached = False
        self.ref, self.ref_quality = self._reference(cache, log or (lambda msg: None))

    def _reference(self, cache, log) -> tuple[dict[str, np.ndarray], QualityResult]:
        from build_models.reference_cache import CachedReference

        entry = cache.load() if cache is not None else None
        if entry is not None and set(entry.outputs) == set(self.splits) and all(
                len(entry.outputs[k]) == self.splits[k].size for k in self.splits):
            self.reference_cached = True
            return entry.outputs, QualityResult(**entry.quality)
        outputs = self.outputs(self.reference_run, "reference")
        quality = self._score(outputs)
        if cache is not None:
            try:
                cache.save(CachedReference(outputs=outputs, quality=dataclasses.asdict(quality)))
            except OSError as exc:
                log(f"note: the reference's outputs were not cached ({exc})")
        return outputs, quality

    @property
    def dataset(self) -> str:
        return self.cfg.dataset

    def outputs(self, run: Runner, name: str) -> dict[str, np.ndarray]:
        """The runner's outputs on every split, with a progress bar over the texts."""
        with progress_bar(sum(b.size for b in self.splits.values()), f"{name}: evaluation", "text") as bar:
            return {k: encode(run, split, bar) for k, split in self.splits.items()}

    def _score(self, outputs: dict[str, np.ndarray]) -> QualityResult:
        if self.task == "embedding":
            acc = _probe_accuracy(outputs["train"], self.train.labels, outputs["test"], self.test.labels)
            result = QualityResult(metric=f"{self.cfg.dataset}_logreg_accuracy", value=acc,
                                   reference_value=None, retention=None)
            if "held_out_test" in outputs:
                h = self.cfg.held_out
                train, test = self.samples["held_out_train"], self.samples["held_out_test"]
                args = (outputs["held_out_train"], train.labels, outputs["held_out_test"], test.labels)
                result.held_out = {"dataset": h.dataset, "metric": f"{h.dataset}_logreg_accuracy",
                                   "value": _probe_accuracy(*args), "knn_accuracy": _knn_accuracy(*args),
                                   "train_samples": len(train), "test_samples": len(test)}
            return result
        preds = outputs["test"].argmax(axis=1)
        pred_labels = [self.labels[i] if self.labels and i < len(self.labels) else str(i) for i in preds]
        extra: dict[str, float | None] = {}
        gold_known = self.labels is not None and set(self.test.labels) <= set(self.labels)
        if gold_known:
            from sklearn.metrics import f1_score

            acc = float(np.mean([p == g for p, g in zip(pred_labels, self.test.labels)]))
            extra["macro_f1"] = float(f1_score(self.test.labels, pred_labels, average="macro"))
        else:
            acc = None  # the corpus labels are not this model's labels: only agreement is meaningful
        return QualityResult(metric="accuracy", value=acc, reference_value=None, retention=None, extra=extra)

    def evaluate(self, run: Runner, name: str = "variant") -> QualityResult:
        outputs = self.outputs(run, name)
        result = self._score(outputs)
        result.reference_value = self.ref_quality.value
        if result.value is not None and result.reference_value:
            result.retention = result.value / result.reference_value
        if self.task == "embedding":
            cos = _cosines(outputs["test"], self.ref["test"])
            result.extra.update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
            self._embedding_types(outputs, result)
            if result.held_out is not None:
                h, ref = result.held_out, self.ref_quality.held_out
                cos = _cosines(outputs["held_out_test"], self.ref["held_out_test"])
                h.update(reference_value=ref["value"], reference_knn_accuracy=ref["knn_accuracy"],
                         retention=h["value"] / ref["value"] if ref["value"] else None,
                         knn_retention=h["knn_accuracy"] / ref["knn_accuracy"] if ref["knn_accuracy"] else None,
                         mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
        else:
            agree = (outputs["test"].argmax(axis=1) == self.ref["test"].argmax(axis=1)).mean()
            result.extra["agreement"] = float(agree)
            if "macro_f1" in result.extra:
                result.extra["reference_macro_f1"] = self.ref_quality.extra.get("macro_f1")
        return result

    def _embedding_types(self, outputs: dict[str, np.ndarray], result: QualityResult) -> None:
        from build_models.lowbit import calibration_ranges, embedding_type_table

        # The probe's train sample doubles as calibration text: encoded once, and never the test split.
        result.ranges = calibration_ranges(outputs["train"], self.cfg.dataset, self.cfg.eval_max_seq_len)
        result.embedding_types = embedding_type_table(
            outputs["test"], outputs["train"], self.ref["test"], self.ref["train"], result.ranges,
            self.train.labels, self.test.labels, self.ref_quality.value, result.value, _probe_accuracy)

    # ------------------------------------------------------------ latency

    def latency_cases(self) -> dict[str, dict[str, np.ndarray]]:
        short = " ".join(self.test.texts[0].split()[:8])
        longest = sorted(self.test.texts, key=len, reverse=True)[:BATCH]
        return {
            "batch1_short": tokenize(self.tokenizer, [short], self.names, 128),
            "batch32_seq128": tokenize(self.tokenizer, longest, self.names, 128, pad_to_max=True),
        }

    def latency(self, runs: dict[str, Runner]) -> dict[str, dict[str, dict[str, float | None]]]:
        """Per variant and case: median ms per batch of the variant and of the references, and the
        speedups. Every variant of the build is timed in one session with the references, in
        alternating blocks, so all of them are compared with the same reference samples and the
        references are timed once per round rather than once per variant.

        Not call-by-call interleaving: ONNX Runtime's and OpenMP's worker threads keep spinning
        after a call and slowed the next runner's short batch (docs/measurements.md). Each block
        starts with an untimed call; two rounds of blocks (R S A B C R S A B C) spread a slow spell
        over all of them.
        """
        references = {"reference": self.reference_run}
        if self.default_reference_run is not None:
            references["reference_sdpa"] = self.default_reference_run
        # Variant names never collide with the references: the keys are tagged.
        runners = {("ref", k): fn for k, fn in references.items()} | {("variant", k): fn for k, fn in runs.items()}
        cases = self.latency_cases()
        out: dict[str, dict[str, dict[str, float | None]]] = {name: {} for name in runs}
        with progress_bar(2 * len(cases) * len(runners), "latency probe", "block") as bar:
            for case, batch in cases.items():
                per_block = max(1, self.cfg.latency_repeats * (4 if case.startswith("batch1") else 1) // 2)
                samples: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
                for _round in range(2):
                    for key, fn in runners.items():
                        fn(batch)  # untimed: absorbs the previous runner's spinning threads
                        for _ in range(per_block):
                            start = time.perf_counter()
                            fn(batch)
                            samples[key].append((time.perf_counter() - start) * 1000)
                        bar.update(1)
                med = {k: statistics.median(v) for k, v in samples.items()}
                for name in runs:
                    variant = med[("variant", name)]
                    row: dict[str, float | None] = {"variant": round(variant, 3)}
                    row |= {k: round(med[("ref", k)], 3) for k in references}
                    row["speedup"] = round(med[("ref", "reference")] / variant, 3)
                    if "reference_sdpa" in references:
                        row["speedup_vs_sdpa"] = round(med[("ref", "reference_sdpa")] / variant, 3)
                    out[name][case] = row
        return out


def check_gates(task: str, quality: QualityResult, gates: GatesConfig) -> list[tuple[str, float | None, float, bool]]:
    """(metric, value, limit, passed) for every gate that applies to the task."""
    checks: list[tuple[str, float | None, float]] = []
    if gates.downstream_retention is not None and (task == "embedding" or quality.value is not None):
        checks.append(("downstream_retention", quality.retention, gates.downstream_retention))
    if task == "embedding":
        # The held-out corpus is gated with the same limits: a variant passes on the worse domain.
        held_out = quality.held_out
        limit = gates.held_out_retention if gates.held_out_retention is not None else gates.downstream_retention
        if held_out is not None and limit is not None:
            checks.append(("held_out_retention", held_out.get("retention"), limit))
            checks.append(("held_out_knn_retention", held_out.get("knn_retention"), limit))
        if gates.mean_cosine is not None:
            checks.append(("mean_cosine", quality.extra.get("mean_cosine"), gates.mean_cosine))
            if held_out is not None:
                checks.append(("held_out_mean_cosine", held_out.get("mean_cosine"), gates.mean_cosine))
        if gates.min_cosine is not None:
            checks.append(("min_cosine", quality.extra.get("min_cosine"), gates.min_cosine))
    elif gates.agreement is not None:
        checks.append(("agreement", quality.extra.get("agreement"), gates.agreement))
    return [(m, v, lim, v is not None and v >= lim) for m, v, lim in checks]
