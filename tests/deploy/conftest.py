"""Shared helpers of the deployment tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_embedding_dir) -> Path:
    """A model store with one tiny ONNX embedding variant, `tiny`, built by the real pipeline."""
    from build_models.pipeline import build

    tmp = tmp_path_factory.mktemp("deploy-store")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "family": "tiny", "source": {"path": str(tiny_embedding_dir)}, "task": "embedding", "max_seq_len": 64,
        "evaluation": {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1},
        "gates": {"downstream_retention": None, "mean_cosine": None},
        "variants": [{"name": "tiny", "steps": [{"export_onnx": {}}, {"optimize": {}}]}],
    }))
    build(recipe, tmp / "store", log=lambda _m: None)
    return tmp / "store"
