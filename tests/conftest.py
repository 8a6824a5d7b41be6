"""Shared test setup: offline environment, and tiny random BERT checkpoints made in-process (the
whole pipeline runs on them in seconds). Helpers live in tests/helpers.py."""

import json
import os
from pathlib import Path

import pytest

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import R8_LABELS, build_tiny_store, save_tokenizer, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-embedding")
    BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(path)
    save_tokenizer(path)
    # sentence-transformers files: the build reads pooling and normalization from them.
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode_mean_tokens": True}))
    return path


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-classifier")
    config = tiny_config(num_labels=len(R8_LABELS), id2label=dict(enumerate(R8_LABELS)),
                         label2id={l: i for i, l in enumerate(R8_LABELS)})
    BertForSequenceClassification(config).save_pretrained(path)
    save_tokenizer(path)
    return path


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
