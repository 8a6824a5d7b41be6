"""KServe v2 over gRPC (service/api/grpc_service.py) with the official tritonclient.grpc client against a
live server: the real app over a store of fake variants (real files and manifests, fake backends), the
gRPC service beside HTTP on the same event loop and registry."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from service.app import create_app  # noqa: E402
from service.backends.fake import FakeBackend  # noqa: E402
from service.manifest import hash_tree  # noqa: E402
from service.registry import Registry  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests.helpers import LABELS, LiveServer, fake_manifest, free_port, scrape, tokenizer_dir, value  # noqa: E402

USER_KEY, ADMIN_KEY = "user-key", "admin-key"
USER = {"authorization": f"Bearer {USER_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MAX_SEQ_LEN = 32
HOLD = threading.Event()  # the `slow` model's batches wait for it


# ------------------------------------------------------------------ a store of fake variants


def publish(store: Path, name: str, task: str = "embedding") -> None:
    """Version 1 of ``name`` as the build publishes it: model file, tokenizer, hashed manifest."""
    folder = store / name / "1"
    folder.mkdir(parents=True)
    tokenizer_dir(folder)
    (folder / "model.onnx").write_bytes(f"fake {name}".encode())
    width = 8 if task == "embedding" else len(LABELS)
    manifest = fake_manifest(name, task, width, MAX_SEQ_LEN, ranges=False)
    (folder / "manifest.json").write_text(manifest.model_copy(update={"files": hash_tree(folder)}).to_json())


def fake_loader(path: Path, manifest, settings) -> FakeBackend:
    if manifest.task == "classification":
        return FakeBackend(task="classification", num_labels=len(LABELS))
    return FakeBackend(dim=8, hold=HOLD if manifest.name == "slow" else None)


def make_app(store: Path, **overrides):
    settings = ServiceSettings(model_store=store, default_model="emb", max_queue_delay_ms=1,
                               max_inputs_per_request=16, max_body_bytes=20_000, grpc_port=free_port(),
                               **overrides)
    return create_app(settings, registry=Registry(settings, backend_loader=fake_loader))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("grpc-store")
    for name, task in (("emb", "embedding"), ("cls", "classification"), ("slow", "embedding"),
                       ("spare", "embedding")):
        publish(store, name, task)
    return store


@pytest.fixture(scope="module")
def live(store):
    """API keys and an admin key set; health open (the default)."""
    HOLD.set()
    app = make_app(store, api_keys=USER_KEY, admin_key=ADMIN_KEY)
    with LiveServer(app) as server:
        server.app = app
        server.grpc_url = f"127.0.0.1:{app.state.settings.grpc_port}"
        yield server


@pytest.fixture
def client(live):
    c = grpcclient.InferenceServerClient(live.grpc_url)
    yield c
    c.close()


@pytest.fixture
def stub(live):
    with grpc.insecure_channel(live.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def registry(live) -> Registry:
    return live.app.state.registry


def expected(live, model: str, texts: list[str], truncate: bool = False) -> np.ndarray:
    entry = registry(live).get(model)
    return np.stack([entry.backends[0].row(e.ids) for e in entry.tokenizer.encode_texts(texts, truncate)])


def text_input(texts: list[str], shape: list[int] | None = None):
    tensor = grpcclient.InferInput("text", shape or [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(shape or [len(texts)]))
    return tensor


def token_inputs(live, model: str, texts: list[str]):
    """input_ids and a right-padding attention_mask, as numpy arrays through set_data_from_numpy."""
    encoded = registry(live).get(model).tokenizer.encode_texts(texts, False)
    ids = np.zeros((len(texts), max(len(e) for e in encoded)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = e.ids, 1
    inputs = [grpcclient.InferInput("input_ids", list(ids.shape), "INT64"),
              grpcclient.InferInput("attention_mask", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask)
    return inputs


def refused(call, status: str, *needles: str) -> str:
    """``call()`` fails with gRPC ``status`` and a message holding every needle; returns the message."""
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{status}", (info.value.status(), info.value.message())
    for needle in needles:
        assert needle in info.value.message(), (needle, info.value.message())
    return info.value.message()


def stub_error(call, status: str, *needles: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == getattr(grpc.StatusCode, status), (info.value.code(), info.value.details())
    for needle in needles:
        assert needle in info.value.details(), (needle, info.value.details())
    return info.value


def texts_request(texts: list[bytes], model: str = "emb", **fields) -> pb.ModelInferRequest:
    """A request with its texts in contents.bytes_contents (not raw_input_contents)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(texts)
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], **fields)


# ------------------------------------------------------------------ health and metadata


def test_health_and_metadata(client):
    # Health is open without a key (BERTSERVE_OPEN_HEALTH_AND_METRICS), the rest needs one.
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("emb", headers=USER) and not client.is_model_ready("nope", headers=USER)
    assert client.is_model_ready("emb", "1", headers=USER) and not client.is_model_ready("emb", "7", headers=USER)
    server = client.get_server_metadata(headers=USER, as_json=True)
    assert server["name"] == "bertserve" and "model_repository" in server["extensions"]
    meta = client.get_model_metadata("cls", headers=USER, as_json=True)
    assert meta["name"] == "cls" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    assert meta["outputs"][0]["shape"] == ["-1", str(len(LABELS))]  # int64 in proto JSON
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "text": "BYTES", "input_ids": "INT64", "attention_mask": "INT64", "token_type_ids": "INT64"}
    refused(lambda: client.get_model_metadata("nope", headers=USER), "NOT_FOUND", "'nope'")


# ------------------------------------------------------------------ inference


def test_infer_texts_and_token_ids(live, client):
    texts = ["hello", "world"]
    result = client.infer("emb", [text_input(texts)], request_id="r1", headers=USER)
    np.testing.assert_allclose(result.as_numpy("embedding"), expected(live, "emb", texts), rtol=1e-6)
    response = result.get_response()
    assert response.id == "r1" and response.model_name == "emb" and response.model_version == "1"
    assert len(response.raw_output_contents) == 1  # as Triton answers

    result = client.infer("emb", [text_input(texts, [2, 1])], model_version="1", headers=USER)
    np.testing.assert_allclose(result.as_numpy("embedding"), expected(live, "emb", texts), rtol=1e-6)

    # Token ids with right padding, against a classifier; one output asked for.
    texts = ["hello", "hello world"]
    result = client.infer("cls", token_inputs(live, "cls", texts), headers=USER)
    np.testing.assert_allclose(result.as_numpy("logits"), expected(live, "cls", texts), rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, rtol=1e-5)
    result = client.infer("cls", token_inputs(live, "cls", texts), headers=USER,
                          outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert result.as_numpy("logits") is None and result.as_numpy("probabilities").shape == (2, len(LABELS))


def test_contents_and_parameters(live, stub):
    # Texts in contents.bytes_contents rather than raw_input_contents.
    answer = stub.ModelInfer(texts_request([b"hello", b"world"]), metadata=tuple(USER.items()))
    rows = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, 8)
    np.testing.assert_allclose(rows, expected(live, "emb", ["hello", "world"]), rtol=1e-6)

    # INT64 token ids in contents.int64_contents.
    ids = registry(live).get("emb").tokenizer.encode_texts(["hello"], False)[0].ids
    tensor = pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, len(ids)])
    tensor.contents.int64_contents.extend(int(i) for i in ids)
    answer = stub.ModelInfer(pb.ModelInferRequest(model_name="emb", inputs=[tensor]), metadata=tuple(USER.items()))
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], dtype="<f4"),
                               expected(live, "emb", ["hello"])[0], rtol=1e-6)

    # truncate (bool), as over HTTP: a text past max_seq_len is refused, or cut when asked.
    long_text = "word " * 100
    stub_error(lambda: stub.ModelInfer(texts_request([long_text.encode()]), metadata=tuple(USER.items())),
               "INVALID_ARGUMENT")
    request = texts_request([long_text.encode()])
    request.parameters["truncate"].bool_param = True
    answer, call = stub.ModelInfer.with_call(request, metadata=(*USER.items(), ("x-request-id", "trunc-1")))
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], dtype="<f4"),
                               expected(live, "emb", [long_text], truncate=True)[0], rtol=1e-6)
    assert dict(call.trailing_metadata())["x-request-id"] == "trunc-1"
    request.parameters["truncate"].string_param = "yes"
    stub_error(lambda: stub.ModelInfer(request, metadata=tuple(USER.items())), "INVALID_ARGUMENT",
               "parameters.truncate must be true or false")

    # long_input=window, as over HTTP: the windows' weighted mean, the same bytes as the HTTP answer.
    windowed = texts_request([long_text.encode()])
    windowed.parameters["long_input"].string_param = "window"
    answer = stub.ModelInfer(windowed, metadata=tuple(USER.items()))
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [long_text]}],
            "parameters": {"long_input": "window"}}
    http = httpx.post(f"{live.url}/v2/models/emb/infer", json=body, headers=USER, timeout=10).json()
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], dtype="<f4"),
                                  np.asarray(http["outputs"][0]["data"], dtype=np.float32))
    assert not np.allclose(np.frombuffer(answer.raw_output_contents[0], dtype="<f4"),
                           expected(live, "emb", [long_text], truncate=True)[0])


def test_the_grpc_answer_is_the_http_answer(live, client):
    texts = ["the same text", "twice over two protocols"]
    for model, outputs in (("emb", ["embedding"]), ("cls", ["logits", "probabilities"])):
        body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
        r = httpx.post(f"{live.url}/v2/models/{model}/infer", json=body, headers=USER, timeout=10)
        assert r.status_code == 200, r.text
        result = client.infer(model, [text_input(texts)], headers=USER)
        for out in r.json()["outputs"]:
            assert out["name"] in outputs
            np.testing.assert_array_equal(result.as_numpy(out["name"]),
                                          np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]))


# ------------------------------------------------------------------ errors


def test_each_error_class_has_its_status(live, client, stub):
    md = tuple(USER.items())
    refused(lambda: client.infer("nope", [text_input(["x"])], headers=USER), "NOT_FOUND", "'nope'")
    refused(lambda: client.infer("emb", [text_input(["x"])], model_version="x", headers=USER), "NOT_FOUND")
    refused(lambda: client.infer("emb", [text_input(["x"] * 17)], headers=USER), "RESOURCE_EXHAUSTED",
            "at most 16")
    refused(lambda: client.infer("emb", [text_input(["  "])], headers=USER), "INVALID_ARGUMENT", "empty string")
    refused(lambda: client.infer("emb", [text_input(["x"])], headers=USER,
                                 outputs=[grpcclient.InferRequestedOutput("nope")]),
            "INVALID_ARGUMENT", "unknown output 'nope'")
    refused(lambda: client.infer("emb", [text_input(["x"])], timeout=0, headers=USER),
            "INVALID_ARGUMENT", "parameters.timeout")
    # Hostile tensors: invalid UTF-8, a datatype we do not take, data of the wrong kind, shapes that lie.
    stub_error(lambda: stub.ModelInfer(texts_request([b"ok", b"\xed\xa0\x80"]), metadata=md),
               "INVALID_ARGUMENT", "text[1] is not valid UTF-8")
    fp = pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, 2])
    fp.contents.fp32_contents.extend([1.0, 2.0])
    stub_error(lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="emb", inputs=[fp]), metadata=md),
               "INVALID_ARGUMENT", "INT64 data goes in contents.int64_contents")
    fp32 = pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="FP32", shape=[1])
    stub_error(lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="emb", inputs=[fp32]), metadata=md),
               "INVALID_ARGUMENT", "datatype 'FP32' is not supported")
    for shape, needle in (([-1], "negative"), ([2**62, 2**62], "values but 1 were sent"), ([1] * 9, "at most 8")):
        request = texts_request([b"x"])
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)
        stub_error(lambda: stub.ModelInfer(request, metadata=md), "INVALID_ARGUMENT", needle)
    request = texts_request([b"x"])
    request.raw_input_contents.append(b"\x01\x00\x00\x00y")
    stub_error(lambda: stub.ModelInfer(request, metadata=md), "INVALID_ARGUMENT",
               "both contents and raw_input_contents")
    # gRPC's own limit, max_body_bytes as over HTTP.
    stub_error(lambda: stub.ModelInfer(texts_request([b"x" * 30_000]), metadata=md), "RESOURCE_EXHAUSTED")
    # Other RPCs of the service.
    refused(lambda: client.get_model_config("emb", headers=USER), "UNIMPLEMENTED", "ModelConfig is not implemented")


def test_keys_through_metadata(live, client):
    refused(lambda: client.infer("emb", [text_input(["x"])]), "UNAUTHENTICATED", "API key")
    refused(lambda: client.infer("emb", [text_input(["x"])], headers={"authorization": "Bearer wrong"}),
            "UNAUTHENTICATED")
    refused(lambda: client.get_model_metadata("emb"), "UNAUTHENTICATED")
    refused(lambda: client.is_model_ready("emb"), "UNAUTHENTICATED")
    # The admin key is not an API key, nor an API key the admin key.
    refused(lambda: client.infer("emb", [text_input(["x"])], headers=ADMIN), "UNAUTHENTICATED")
    refused(lambda: client.get_model_repository_index(headers=USER), "UNAUTHENTICATED", "admin key")
    refused(lambda: client.get_model_repository_index(), "UNAUTHENTICATED", "admin key")


def test_overload_is_unavailable_with_retry_after(live, stub, monkeypatch):
    admission = registry(live).get("emb").batcher.admission
    monkeypatch.setattr(admission, "saturated", lambda items: True)
    error = stub_error(lambda: stub.ModelInfer(texts_request([b"hello"]), metadata=tuple(USER.items())),
                       "UNAVAILABLE")
    assert int(dict(error.trailing_metadata())["retry-after"]) >= 1


def test_deadline_and_cancel_drop_queued_items(live, client):
    slow = registry(live).get("slow")
    backend = slow.backends[0]
    HOLD.clear()
    try:
        first = []
        client.async_infer("slow", [text_input(["first"])], callback=lambda result, error: first.append(error),
                           headers=USER)
        assert backend.entered.wait(5)
        # Queued behind the held batch: the call's deadline becomes the request's timeout.
        started = time.monotonic()
        refused(lambda: client.infer("slow", [text_input(["deadline"])], client_timeout=0.3, headers=USER),
                "DEADLINE_EXCEEDED")
        assert time.monotonic() - started < 3
        # A cancelled call's queued items are dropped.
        cancelled = []
        future = client.async_infer("slow", [text_input(["cancelled"])], headers=USER,
                                    callback=lambda result, error: cancelled.append(error))
        deadline = time.monotonic() + 5
        while slow.batcher.queue_depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        future.cancel()
        deadline = time.monotonic() + 5
        while slow.batcher.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.batcher.queue_depth == 0
    finally:
        HOLD.set()
    deadline = time.monotonic() + 5
    while not first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first == [None]
    tokenizer = slow.tokenizer
    seen = [tokenizer.encode_texts([t], False)[0].ids.tolist() for t in ("first", "deadline", "cancelled")]
    assert backend.seen_ids.count(seen[0]) == 1 and seen[1] not in backend.seen_ids and seen[2] not in backend.seen_ids
    samples = scrape(httpx.Client(base_url=live.url))
    assert value(samples, "bertserve_requests_total", model="slow", route="ModelInfer", code="499",
                 protocol="grpc") == 1
    assert value(samples, "bertserve_rejections_total", model="slow", reason="timeout") == 1


# ------------------------------------------------------------------ the model repository


def test_repository_with_the_admin_key(live, client):
    index = {m["name"]: m for m in client.get_model_repository_index(headers=ADMIN, as_json=True)["models"]}
    assert index["spare"]["state"] == "READY" and index["spare"]["version"] == "1"
    client.unload_model("spare", headers=ADMIN)
    assert not client.is_model_ready("spare", headers=USER)
    refused(lambda: client.infer("spare", [text_input(["x"])], headers=USER), "NOT_FOUND")
    index = {m["name"]: m for m in client.get_model_repository_index(headers=ADMIN, as_json=True)["models"]}
    assert index["spare"]["state"] == "UNAVAILABLE" and index["spare"]["reason"] == "unloaded"
    client.load_model("spare", headers=ADMIN)
    assert client.is_model_ready("spare", headers=USER)
    assert client.infer("spare", [text_input(["x"])], headers=USER).as_numpy("embedding").shape == (1, 8)
    refused(lambda: client.load_model("absent", headers=ADMIN), "NOT_FOUND", "not in the model store")
    refused(lambda: client.load_model("spare", config="{}", headers=ADMIN), "INVALID_ARGUMENT",
            "overriding a model's configuration")


def test_open_server_and_disabled_repository(store):
    app = make_app(store)
    with LiveServer(app):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{app.state.settings.grpc_port}")
        try:
            assert client.infer("emb", [text_input(["x"])]).as_numpy("embedding").shape == (1, 8)
            assert "model_repository" not in client.get_server_metadata(as_json=True)["extensions"]
            refused(lambda: client.get_model_repository_index(headers=ADMIN), "PERMISSION_DENIED",
                    "BERTSERVE_ADMIN_KEY")
            refused(lambda: client.unload_model("emb"), "PERMISSION_DENIED")
        finally:
            client.close()


# ------------------------------------------------------------------ metrics, log, lifecycle


def test_metrics_and_access_log(live, client, caplog):
    with caplog.at_level(logging.INFO, logger="bertserve.access"):
        client.infer("emb", [text_input(["counted"])], request_id="ignored", headers={**USER, "x-request-id": "log-1"})
        client.is_server_live()  # a probe: counted, not logged
        time.sleep(0.1)
    lines = [r.fields for r in caplog.records if r.name == "bertserve.access" and r.fields.get("protocol") == "grpc"]
    assert [(line["request_id"], line["route"], line["model"], line["status"], line["grpc_status"])
            for line in lines] == [("log-1", "ModelInfer", "emb", 200, "OK")]
    samples = scrape(httpx.Client(base_url=live.url))
    assert value(samples, "bertserve_requests_total", model="emb", route="ModelInfer", code="200",
                 protocol="grpc") >= 1
    assert value(samples, "bertserve_request_duration_seconds_count", model="emb", route="ModelInfer",
                 protocol="grpc") >= 1
    assert value(samples, "bertserve_requests_total", model="none", route="ServerLive", code="200",
                 protocol="grpc") >= 1
    # Series from start-up for every model, as for the HTTP inference routes.
    assert value(samples, "bertserve_requests_total", model="spare", route="ModelInfer", code="200",
                 protocol="grpc") >= 0
    assert value(samples, "bertserve_requests_total", model="emb", route="/embed", code="200", protocol="http") == 0


def test_shutdown_lets_a_call_in_flight_finish(store):
    app = make_app(store)
    server = LiveServer(app)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{app.state.settings.grpc_port}")
    HOLD.clear()
    try:
        answers = []
        client.async_infer("slow", [text_input(["in flight"])],
                           callback=lambda result, error: answers.append((result, error)))
        assert app.state.registry.get("slow").backends[0].entered.wait(5)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        time.sleep(0.3)
        assert not answers and stopping.is_alive()  # the server waits for the call
        HOLD.set()
        stopping.join(10)
        assert not stopping.is_alive()
        result, error = answers[0]
        assert error is None and result.as_numpy("embedding").shape == (1, 8)
    finally:
        HOLD.set()
        client.close()
        server.stop()


@functools.cache
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def test_start_up_fails_in_one_line_without_grpcio(tmp_path):
    code = "import sys; sys.modules['grpc'] = None; from service.__main__ import main; main()"
    env = {**os.environ, "BERTSERVE_GRPC_PORT": str(free_port()), "BERTSERVE_MODEL_STORE": str(tmp_path),
           "PYTHONPATH": str(_repo_root())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "BERTSERVE_GRPC_PORT is set but grpcio is not installed" in lines[0], done.stderr
    assert "bertserve[grpc]" in lines[0]


def test_every_error_has_its_grpc_status():
    from service import errors
    from service.api.errors import grpc_status

    want = {
        errors.InvalidInput: "INVALID_ARGUMENT", errors.ModelLoadFailed: "INVALID_ARGUMENT",
        errors.Unauthorized: "UNAUTHENTICATED", errors.Forbidden: "PERMISSION_DENIED",
        errors.ModelNotFound: "NOT_FOUND", errors.NotImplementedHere: "UNIMPLEMENTED",
        errors.PayloadTooLarge: "RESOURCE_EXHAUSTED", errors.Overloaded: "UNAVAILABLE",
        errors.NotReady: "UNAVAILABLE", errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
        errors.ClientDisconnected: "CANCELLED", errors.InferenceFailed: "INTERNAL", errors.ServiceError: "INTERNAL",
    }
    # A new error class must be given its code here (and in service/api/errors.py, if not by its status).
    assert set(want) == {errors.ServiceError, *errors.ServiceError.__subclasses__()}
    for cls, code in want.items():
        assert grpc_status(cls.status_code, cls.type) == code, cls
    assert grpc_status(500, "internal_error") == "INTERNAL" and grpc_status(422, "invalid_input") == "INVALID_ARGUMENT"


def test_grpc_port_setting():
    assert ServiceSettings().grpc_port is None  # off by default
    assert ServiceSettings(grpc_port=8001).grpc_port == 8001
    for bad in (0, 70000):
        with pytest.raises(ValueError):
            ServiceSettings(grpc_port=bad)
    with pytest.raises(ValueError, match="port of its own"):
        ServiceSettings(port=8000, grpc_port=8000)
