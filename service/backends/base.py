"""The backend seam: ONNX Runtime, TorchScript and the fake backend are interchangeable behind it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.manifest import Manifest
from service.settings import ServiceSettings


@dataclass(frozen=True)
class BackendInfo:
    format: str
    precision: str
    provider: str
    output_name: str


class Backend(Protocol):
    info: BackendInfo

    def warmup(self) -> None: ...

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """int64 [B, T] inputs by name -> outputs by name, B rows each. Synchronous; thread-safe."""
        ...

    def close(self) -> None: ...


class ProviderUnavailable(Exception):
    """The variant was built for an execution provider this machine lacks: skip it, not an error."""


def load_backend(path: Path, manifest: Manifest, settings: ServiceSettings) -> Backend:
    if manifest.format == "onnx":
        from service.backends.onnx import OnnxBackend

        return OnnxBackend.load(path, manifest, settings)
    if manifest.format == "torchscript":
        from service.backends.torchscript import TorchScriptBackend

        return TorchScriptBackend.load(path, manifest, settings)
    raise ValueError(f"unknown model format {manifest.format!r}")


def warmup_batch(manifest: Manifest, batch: int = 2, length: int = 16) -> dict[str, np.ndarray]:
    ids = np.full((batch, length), 1000, dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[-1, length // 2 :] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {i.name: feeds[i.name] for i in manifest.inputs}
