"""The real app over fake backends: every route, batcher and error path without a model file."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import ServiceSettings
from tests.helpers import make_registry


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
