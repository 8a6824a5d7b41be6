"""Shared test setup: offline environment, and tiny random BERT checkpoints made in-process (the
whole pipeline runs on them in seconds). Helpers live in tests/helpers.py."""

import os
from pathlib import Path

import pytest

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import (R8_LABELS, build_tiny_store, save_sentence_transformers_files,  # noqa: E402
                           save_tiny_bert, save_tiny_classifier)


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory) -> Path:
    path = save_tiny_bert(tmp_path_factory.mktemp("tiny-embedding"), seed=0)
    save_sentence_transformers_files(path, {"pooling_mode_mean_tokens": True})
    return path


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"), R8_LABELS, seed=1)


@pytest.fixture(scope="session")
def mixed_batch():
    """Mixed lengths with padding, as a server batch looks."""
    return [
        "Oil prices rose sharply on Monday after the cartel agreed to cut output.",
        "ok",
        "The company said its quarterly profit doubled, beating forecasts, and raised its dividend "
        "for the third time this year while announcing a buyback of up to ten percent of shares.",
        "Wheat exports fell.",
    ]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_embedding_dir) -> Path:
    """A model store with one tiny ONNX embedding variant, `tiny`, built by the real pipeline."""
    return build_tiny_store(tmp_path_factory.mktemp("deploy-store"), tiny_embedding_dir,
                            [{"name": "tiny", "steps": [{"export_onnx": {}}, {"optimize": {}}]}])
