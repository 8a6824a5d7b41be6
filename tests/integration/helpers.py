"""Helpers that integration tests share and that need torch and onnxruntime, kept out of tests/helpers.py
so that tests/unit never imports them."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.manifest import load_verified


def run_variant(variant_dir: Path, feeds: dict) -> np.ndarray:
    """The first output of a published variant (ONNX on CPU, or TorchScript) on numpy ``feeds``."""
    manifest = load_verified(variant_dir)
    names = [i.name for i in manifest.inputs]
    if manifest.format == "onnx":
        session = ort.InferenceSession(str(variant_dir / manifest.model_file), providers=["CPUExecutionProvider"])
        return session.run(None, {n: feeds[n] for n in names})[0]
    module = torch.jit.load(str(variant_dir / manifest.model_file))
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
