"""Shared helpers of the deployment tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import build_tiny_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_embedding_dir) -> Path:
    """A model store with one tiny ONNX embedding variant, `tiny`, built by the real pipeline."""
    return build_tiny_store(tmp_path_factory.mktemp("deploy-store"), tiny_embedding_dir,
                            [{"name": "tiny", "steps": [{"export_onnx": {}}, {"optimize": {}}]}])
