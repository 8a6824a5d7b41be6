"""The manifest: the one contract between the offline build and the server.

Every published variant directory holds ``manifest.json`` describing how the variant was made
(lineage), what it is (format, precision, inputs/outputs, pooling), what it measured (quality
against the fp32 reference, latency probe, fused-node counts) and the sha256 of every file. The
server refuses a variant whose files do not match, whose folder holds a file it does not list, or that
names a path outside its folder. This module depends on pydantic only, so the build and the server
(and unit tests) can import it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, ValidationError, model_validator

from service.long_input import Policy
from service.strict import StrictModel

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# What the server reads from a variant's tokenizer folder (service/tokenization.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# ASCII digits only ("١" and "²" are digits to str.isdigit()), at most 9 as the KServe routes take, and
# no leading zero: "01" beside "1" would be a second folder for one version. 0 is no version.
VERSION = re.compile(r"[1-9][0-9]{0,8}")

Task = Literal["embedding", "classification"]
Format = Literal["onnx", "torchscript"]
# int2: 2-bit weights (MatMulNBits bits=2) of a ternary or binary qat student.
Precision = Literal["fp32", "fp16", "int8", "int4", "int2"]
Pooling = Literal["mean", "cls", "max", "none"]


class ManifestError(Exception):
    """A manifest is missing, malformed, or does not match the files beside it."""


class TensorSpec(StrictModel):
    name: str
    dtype: str
    # Symbolic axes are strings ("batch", "sequence"); fixed ones are ints.
    shape: list[int | str]


class FileEntry(StrictModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class StepRecord(StrictModel):
    """One build step as it ran: its name and every parameter, defaults included."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # What the step observed while running (fused-node counts, quantizer settings picked, ...).
    details: dict[str, Any] = Field(default_factory=dict)


class Lineage(StrictModel):
    source: dict[str, Any]
    recipe: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    builder: dict[str, str] = Field(default_factory=dict)


class QualityGateResult(StrictModel):
    metric: str
    value: float | None
    limit: float
    passed: bool


class EmbeddingRanges(StrictModel):
    """Per-dimension min and max of an embedding variant's own outputs on calibration text.

    The server maps each dimension's range onto 256 buckets for ``int8``/``uint8`` embeddings
    (service/embedding_types.py). Measured on the train split, never on text the build scores on.
    """

    min: list[float]
    max: list[float]
    samples: int = Field(ge=1)  # texts the ranges were measured on
    dataset: str
    split: Literal["train"] = "train"
    max_seq_len: int | None = Field(None, ge=1)  # tokens per calibration text

    @model_validator(mode="after")
    def _ordered(self) -> "EmbeddingRanges":
        if len(self.min) != len(self.max):
            raise ValueError(f"min has {len(self.min)} values and max {len(self.max)}")
        bad = next((i for i, (lo, hi) in enumerate(zip(self.min, self.max)) if not lo <= hi), None)
        if bad is not None:
            raise ValueError(f"dimension {bad}: min {self.min[bad]} is above max {self.max[bad]}")
        return self


class EmbeddingTypeCost(StrictModel):
    """What serving one embedding type costs against the fp32 reference's float vectors."""

    type: Literal["float32", "int8", "uint8", "binary"]  # ubinary: the same bits as binary
    bytes_per_vector: int
    probe_accuracy: float | None
    probe_retention: float | None  # probe_accuracy / the reference's float probe accuracy
    recall_at_k: float | None  # overlap of the top k with the reference's float top k
    # The type's own top `rescore_candidates` reordered by float cosine (floats fetched for those only).
    recall_at_k_rescored: float | None = None


class EmbeddingTypesQuality(StrictModel):
    k: int
    rescore_candidates: int
    queries: int
    corpus: int
    similarity: dict[str, str]  # type -> how retrieval scores it (cosine, integer dot product, Hamming)
    rows: list[EmbeddingTypeCost]
    note: str | None = None


class HeldOutQuality(StrictModel):
    """The same probe on a corpus no build step trained or calibrated on, plus a kNN vote: the
    gate takes the worse of this and the first corpus."""

    dataset: str
    metric: str
    value: float | None  # the variant's probe accuracy
    reference_value: float | None
    retention: float | None
    knn_accuracy: float | None = None  # 10 nearest probe-train texts by cosine vote
    reference_knn_accuracy: float | None = None
    knn_retention: float | None = None
    mean_cosine: float | None = None  # to the reference's vectors of the same texts
    min_cosine: float | None = None
    train_samples: int | None = None
    test_samples: int | None = None


class Quality(StrictModel):
    """Quality of the variant measured against the fp32 PyTorch reference of the same source."""

    dataset: str
    metric: str  # the downstream metric, e.g. "r8_logreg_accuracy" or "accuracy"
    value: float | None
    reference_value: float | None
    retention: float | None
    # Task-specific extras: mean/min cosine for embeddings, macro-F1 and agreement for classifiers.
    extra: dict[str, float | None] = Field(default_factory=dict)
    gates: list[QualityGateResult] = Field(default_factory=list)
    # Embedding variants: probe retention and retrieval recall of float32, int8, uint8 and binary vectors.
    embedding_types: EmbeddingTypesQuality | None = None
    held_out: HeldOutQuality | None = None
    measured_on: str = "CPUExecutionProvider"
    note: str | None = None


class LatencyProbe(StrictModel):
    """In-process timings taken at build time, with the reference measured in the same run."""

    unit: Literal["ms_per_batch"] = "ms_per_batch"
    threads: int
    cases: dict[str, dict[str, float | None]]  # case -> {variant, reference, speedup[, speedup_vs_baseline]}
    baseline: str | None = None  # the variant of the same build speedup_vs_baseline compares with
    note: str | None = None


class Manifest(StrictModel):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=f"^{NAME.pattern}$")
    version: int = Field(ge=1)
    family: str | None = None  # the recipe's family: variants of one source, compared on one chart
    task: Task
    format: Format
    precision: Precision
    providers: list[str]  # execution providers this variant is built for, preferred first
    model_file: str
    tokenizer_dir: str = "tokenizer"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_seq_len: int = Field(ge=1)
    embedding_dim: int | None = None
    pooling: Pooling | None = None
    normalize: bool = False
    labels: list[str] | None = None
    # Inputs longer than max_seq_len (service/long_input.py): this model's own policy and window
    # overlap, or None for the server's settings.
    long_input: Policy | None = None
    window_overlap: int | None = Field(None, ge=0)
    # sentence-transformers prompts from the checkpoint (config_sentence_transformers.json): name to the
    # text put before an input; the default one applies when a request names none.
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt_name: str | None = None
    # Calibration for int8/uint8 embeddings; absent in manifests built before it existed.
    embedding_ranges: EmbeddingRanges | None = None
    files: dict[str, FileEntry]
    lineage: Lineage
    quality: Quality | None = None
    latency: LatencyProbe | None = None
    fused_nodes: dict[str, int] = Field(default_factory=dict)
    created_at: str

    @model_validator(mode="after")
    def _ranges_fit(self) -> "Manifest":
        if self.embedding_ranges is not None:
            if self.task != "embedding":
                raise ValueError("embedding_ranges only apply to embedding models")
            if len(self.embedding_ranges.min) != self.embedding_dim:
                raise ValueError(f"embedding_ranges cover {len(self.embedding_ranges.min)} dimensions, "
                                 f"embedding_dim is {self.embedding_dim}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, FileEntry]:
    """sha256 and size of every file under ``root`` keyed by POSIX relative path."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        entries[rel] = FileEntry(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    return entries


Skip = Callable[[Path, str], None]  # (path, why) of a store entry that is no variant's folder


def _ignore(_path: Path, _why: str) -> None:
    pass


def version_numbers(name_dir: Path, skip: Skip = _ignore) -> list[int]:
    """Published versions under ``<store>/<name>/``, ascending: folders named by a version number
    (``VERSION``). Every other entry goes to ``skip`` with the reason, but hidden ones, which are
    nobody's business. Raises OSError when ``name_dir`` cannot be listed."""
    if not name_dir.is_dir():
        return []
    versions = []
    for path in sorted(name_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if not VERSION.fullmatch(path.name):
            skip(path, _not_a_version(path.name))
            continue
        try:
            is_dir = path.is_dir()
        except OSError as exc:
            skip(path, _unreadable(exc))
            continue
        if is_dir:
            versions.append(int(path.name))
        else:
            skip(path, "not a folder")
    return sorted(versions)


def store_versions(store: Path, skip: Skip = _ignore) -> dict[str, list[int]]:
    """Every variant name in a store with its versions. Hidden folders (the build's staging) are left
    out; every other entry that is not a model folder (``NAME``, the manifest's name pattern) holding
    version folders goes to ``skip`` with the reason. Raises OSError when ``store`` cannot be listed."""
    if not store.is_dir():
        return {}
    found = {}
    for name_dir in sorted(store.iterdir()):
        if name_dir.name.startswith("."):
            continue
        if not NAME.fullmatch(name_dir.name):
            skip(name_dir, "not a model folder (a model's name is lower-case letters, digits, '.', '_' and '-')")
            continue
        try:
            if not name_dir.is_dir():
                skip(name_dir, "not a folder")
                continue
            versions = version_numbers(name_dir, skip)
        except OSError as exc:
            skip(name_dir, _unreadable(exc))
            continue
        if versions:
            found[name_dir.name] = versions
    return found


def _not_a_version(name: str) -> str:
    rule = "versions are numbers from 1 to 999999999 in ASCII digits, without leading zeros"
    if len(name) > 1 and name.startswith("0") and name.isascii() and name.isdigit():
        return f"not a version folder: a leading zero ({rule})"
    return f"not a version folder ({rule})"


def _unreadable(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror or exc})"


def inside(variant_dir: Path, rel: str) -> Path:
    """``variant_dir / rel`` with symlinks resolved, for ``rel`` a path a manifest names. A version folder
    is closed: raises ManifestError naming ``rel`` unless it is written as hash_tree writes paths
    (relative, "/"-separated, no empty, "." or ".." part) and stays in the folder through any symlink."""
    root = Path(variant_dir)
    if not rel or rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
        raise ManifestError(f"{root}: {rel!r} is not a path inside the version folder")
    try:
        base = root.resolve()
        path = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise ManifestError(f"{root}: {rel!r} cannot be resolved to a path inside the version folder") from None
    if not path.is_relative_to(base):
        raise ManifestError(f"{root}: {rel} leads out of the version folder")
    return path


def load_manifest(variant_dir: Path) -> Manifest:
    path = Path(variant_dir) / MANIFEST_FILE  # as messages name it: the registry shortens the store's path
    try:
        raw = json.loads(inside(variant_dir, MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ManifestError(f"{path}: field {loc}: {first['msg']}") from None


def verify_files(variant_dir: Path, manifest: Manifest) -> None:
    """Raise ManifestError unless the version folder holds the files the manifest lists, each with its
    recorded size and sha256, and nothing else but ``manifest.json`` and folders; every path the manifest
    names leads to a place inside the folder; and every file the server reads is among the listed."""
    root = Path(variant_dir)
    for rel, entry in manifest.files.items():
        path = inside(root, rel)
        if not path.is_file():
            raise ManifestError(f"{root}: file {rel} listed in the manifest is missing")
        if path.stat().st_size != entry.size_bytes:
            raise ManifestError(
                f"{root}: file {rel} has {path.stat().st_size} bytes, manifest says {entry.size_bytes}"
            )
        if sha256_file(path) != entry.sha256:
            raise ManifestError(f"{root}: file {rel} does not match its sha256 in the manifest")
    inside(root, manifest.model_file)
    if manifest.model_file not in manifest.files:
        raise ManifestError(f"{root}: model file {manifest.model_file} is not listed in the manifest files")
    inside(root, manifest.tokenizer_dir)
    # By name, not only by the walk below: a folder that may be entered but not listed hides its files
    # from the walk, not from the server.
    for name in TOKENIZER_FILES:
        rel = f"{manifest.tokenizer_dir}/{name}"
        if rel not in manifest.files and os.path.lexists(inside(root, rel)):
            raise ManifestError(f"{root}: file {rel} is not listed in the manifest files")
    # Anything else is refused too, hidden files included: publishing lists every file (hash_tree), so
    # an unlisted one was added afterwards, and no rule here has to know which of them the server reads.
    # A symlink to a folder is not followed, so it cannot be listed: it is refused as well.
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST_FILE and rel not in manifest.files and (path.is_symlink() or not path.is_dir()):
            raise ManifestError(f"{root}: file {rel} is not listed in the manifest files")


def load_verified(variant_dir: Path) -> Manifest:
    manifest = load_manifest(variant_dir)
    verify_files(variant_dir, manifest)
    return manifest
