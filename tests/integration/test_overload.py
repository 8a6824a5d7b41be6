"""Ten times the service's capacity for 30 s, from a bounded open loop on loopback, against the real
MiniLM (fp32, fused) in a server subprocess: the server stays up, memory stays bounded, excess load is
refused at once with 429 and Retry-After, bad requests are never served, and every accepted request
gets the right answer. The share of the unloaded maximum that stays accepted is printed and reported
(docs/measurements.md), not asserted: it is a timing on a machine the load generator shares."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bench.pressure import RssSampler, capacity, offered_load, rss_trend, run_client
from bench.rawhttp import Connection
from build_models.corpora import load_split
from service.manifest import load_verified
from tests.helpers import start_bertserve

OVERLOAD_FACTOR = 10
OVERLOAD_S = 30


def expected_embeddings(store: Path, texts: list[str]) -> np.ndarray:
    """Each text embedded alone in this process: what the server must answer, whatever its batches."""
    import onnxruntime as ort

    from service.tokenization import TextTokenizer

    path = store / "minilm-fp32" / "1"
    manifest = load_verified(path)
    session = ort.InferenceSession(str(path / manifest.model_file), providers=["CPUExecutionProvider"])
    tok = TextTokenizer(path / "tokenizer", manifest.max_seq_len)
    rows = []
    for text in texts:
        (enc,) = tok.encode_texts([text], truncate=True)
        ids = np.asarray([enc.ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        rows.append(session.run(None, {i.name: feeds[i.name] for i in manifest.inputs})[0][0])
    return np.stack(rows)


@pytest.mark.slow
def test_ten_times_capacity_is_refused_promptly_and_accepted_work_is_right(minilm_fp32_store, tmp_path):
    # Real news of 15-40 words: inside the store's 64-token limit, so every request is valid.
    texts = [t for t in load_split("reuters-r8", "test").texts if 15 <= len(t.split()) <= 40][:96]
    expected = expected_embeddings(minilm_fp32_store, texts)
    # 768 client connections, and as many on the server (which inherits this limit): above the common
    # soft limit of 1024 open files once the rest is counted, so raise it up to the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY else min(4096, hard), hard))
    # The queue-wait bound at 1 s rather than the default 10 s: 768 outstanding texts are more than
    # 10 s of work on a slow 2-core machine but only about 4 s on an AVX-512 one (206 texts/s), which then
    # answered everything and refused nothing. With 1 s the load overloads any CPU this model runs on
    # below 768 texts/s, while the unloaded phase (16 at a time) stays far inside it.
    server, port = start_bertserve(minilm_fp32_store, "minilm-fp32", tmp_path / "server.log",
                                   max_chars_per_text="10000", max_body_bytes="65536", max_queue_wait_ms="1000")
    try:
        conn = Connection("127.0.0.1", port)
        requests = [conn.request_bytes("POST", "/v1/embeddings", json.dumps({"input": t}).encode()) for t in texts]
        # Limits must hold under load too: bad requests are never served.
        bad = {"too many inputs": ({"input": ["news"] * 300}, "413"), "empty text": ({"input": ""}, "422"),
               "too many characters": ({"input": "word " * 2500}, "413"),
               "body too large": ({"input": ["word " * 1500] * 10}, "413"), "not json": (None, "422")}
        bad_expected = {}
        for body, status in bad.values():
            raw = b"{not json" if body is None else json.dumps(body).encode()
            bad_expected[len(requests)] = status
            requests.append(conn.request_bytes("POST", "/v1/embeddings", raw))

        def check(status, headers, body, index) -> str | None:
            if index in bad_expected:
                return f"bad request {index} was accepted"
            got = np.asarray(orjson.loads(body)["data"][0]["embedding"], dtype=np.float32)
            diff = float(np.abs(got - expected[index]).max())
            return None if diff < 1e-4 else f"text {index}: max abs diff {diff:.2e}"

        unloaded = run_client(capacity("127.0.0.1", port, requests, concurrency=16, seconds=8, check=check))
        assert {a.status for a in unloaded.answers if a.index not in bad_expected} == {"200"}
        cap = sum(a.status == "200" for a in unloaded.answers) / unloaded.seconds

        sampler = RssSampler(server.pid, interval_s=0.5)
        sampler.start()
        loaded = run_client(offered_load("127.0.0.1", port, requests, OVERLOAD_FACTOR * cap, OVERLOAD_S,
                                          max_outstanding=768, check=check))
        rss = rss_trend(sampler.stop())
        # Unloaded, each bad request gets its own 4xx; under overload the door may refuse it first
        # (429, before reading it closely), but none is ever served or answered with a 5xx.
        wrong = [(a.index, a.status) for a in unloaded.answers
                 if a.index in bad_expected and a.status != bad_expected[a.index]]
        wrong += [(a.index, a.status) for a in loaded.answers
                  if a.index in bad_expected and a.status not in (bad_expected[a.index], "429")]
        assert wrong == [], wrong
        loaded.answers = [a for a in loaded.answers if a.index not in bad_expected]
        statuses = {s: loaded.count(s) for s in {a.status for a in loaded.answers}}
        figures = {"capacity_texts_per_s": round(cap, 1), "offered_per_s": round(OVERLOAD_FACTOR * cap, 1),
                   "accepted_per_s": round(loaded.accepted_per_s(), 1), "statuses": statuses,
                   "not_sent": loaded.not_sent, "p50_429_ms": round(1000 * (loaded.latency_quantile("429", 0.5) or 0), 1),
                   "p99_429_ms": round(1000 * (loaded.latency_quantile("429", 0.99) or 0), 1),
                   "p99_200_ms": round(1000 * (loaded.latency_quantile("200", 0.99) or 0), 1), "rss": rss}
        print("overload figures:", json.dumps(figures))

        assert server.poll() is None, "the server died under overload"
        assert set(statuses) <= {"200", "429"}, figures  # no 5xx, no timeouts, no broken connections
        assert statuses.get("429", 0) > 0, figures  # it really was overloaded
        assert all(a.retry_after and int(a.retry_after) >= 1 for a in loaded.answers if a.status == "429")
        assert [a.problem for a in loaded.answers if a.problem] == []  # every accepted answer is right
        # Refused at once, not after the 30 s request timeout. The typical refusal takes milliseconds (p50
        # 13 ms in a quiet run); the tail is the wait to be read while the event loop, sharing two cores
        # with the model and this generator, falls behind 768 outstanding requests: p99 1.0-1.4 s in quiet
        # runs of this test, up to 5 s in other runs of the same load. So: the median within 3 s, the
        # slowest 1% well inside the request timeout (docs/reliability.md).
        assert loaded.latency_quantile("429", 0.5) < 3.0, figures
        assert loaded.latency_quantile("429", 0.99) < 10.0, figures
        # How much accepted work keeps pace with the unloaded maximum is a timing: it is reported
        # (docs/measurements.md, `python -m bench.pressure overload`), not asserted.
        # Bounded: the queue holds at most about BERTSERVE_MAX_QUEUE_WAIT_MS of work, so memory must not
        # climb with load.
        assert rss["peak_mb"] - rss["start_mb"] < 200, figures
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
