"""Do position windows help on long documents, and what do they cost? ``window`` against ``truncate``
through a live bertserve, on the bundled corpora's documents longer than the model's max_seq_len.

    python -m bench.long_docs [--models minilm,minilm-small] [--corpora reuters-r8,reuters-r52,20newsgroups]
                              [--train 240] [--test 160] [--max-tokens 2048] [--out bench/reports/long-docs.md]

For each corpus, documents of more than max_seq_len tokens (the model's own tokenizer, special tokens
included) and at most ``--max-tokens`` are sampled from the train and the test split (a fixed seed).
Every document is embedded twice through the server, once per policy, by 4 concurrent clients sending 4
documents per request. Quality, from each policy's own vectors:
- probe: a logistic regression trained on the train documents, accuracy on the test documents (the
  build's probe, build_models/evaluate.py);
- kNN: each test document's 5 nearest train documents by cosine, majority label.
Cost: documents per second through the server, and the windows (model inputs) per document. Never
asserts; the figures go to docs/measurements.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.procstat import cpu_model, isa, isa_text
from bench.run import REPO, code_version
from bench.servers import HOST, ServerProcess, bertserve_argv, child_env, free_port
from bench.workloads import load_manifest, load_tokenizer

POLICIES = ("truncate", "window")
CLIENTS, PER_REQUEST, K = 4, 4, 5


def long_documents(corpus: str, split: str, tok, max_seq_len: int, max_tokens: int, n: int, seed: int):
    """Up to ``n`` (text, label, tokens) of the split longer than max_seq_len, at most max_tokens."""
    from build_models.corpora import load_split

    data = load_split(corpus, split)
    lengths = [len(e.ids) for e in tok.encode_batch(data.texts, add_special_tokens=True)]
    long = [(t, label, n_tok) for t, label, n_tok in zip(data.texts, data.labels, lengths)
            if max_seq_len < n_tok <= max_tokens]
    random.Random(seed).shuffle(long)
    return long[:n], sum(1 for n_tok in lengths if n_tok > max_seq_len), len(data)


def embed(url: str, model: str, texts: list[str], policy: str) -> tuple[np.ndarray, float, int]:
    """Vectors of ``texts`` (in order), the seconds it took, and the tokens the server counted."""
    chunks = [texts[i: i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]

    def send(chunk: list[str]) -> tuple[list, int]:
        with httpx.Client(timeout=600, trust_env=False) as client:
            r = client.post(f"{url}/v1/embeddings", json={"model": model, "input": chunk, "long_input": policy})
        r.raise_for_status()
        body = r.json()
        return [d["embedding"] for d in body["data"]], body["usage"]["prompt_tokens"]

    began = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(send, chunks))
    seconds = time.perf_counter() - began
    return np.asarray([v for rows, _ in answers for v in rows], dtype=np.float32), seconds, sum(t for _, t in answers)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = K) -> float:
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    train_y = np.asarray(train_y)
    hits = 0
    for row, gold in zip(nearest, test_y):
        labels, counts = np.unique(train_y[row], return_counts=True)
        hits += labels[np.argmax(counts)] == gold
    return hits / len(test_y)


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0).fit(train_x, train_y)
    return float((clf.predict(test_x) == np.asarray(test_y)).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    parser.add_argument("--models", default="minilm,minilm-small")
    parser.add_argument("--corpora", default="reuters-r8,reuters-r52,20newsgroups")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "reports" / "long-docs.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    port = free_port()
    env = child_env({"BERTSERVE_PORT": str(port), "BERTSERVE_HOST": HOST, "BERTSERVE_MODEL_STORE": str(args.store),
                     "BERTSERVE_DEFAULT_MODEL": models[0], "BERTSERVE_MAX_WINDOWS_PER_INPUT": "64",
                     "BERTSERVE_ACCESS_LOG": "false", "BERTSERVE_REQUEST_TIMEOUT_S": "600",
                     "BERTSERVE_MAX_QUEUE_WAIT_MS": "0"})
    rows, started = [], dt.datetime.now(dt.timezone.utc)
    with ServerProcess("bertserve", bertserve_argv(), env, port, REPO) as server:
        for model in models:
            path, manifest = load_manifest(args.store, model)
            tok, max_seq_len = load_tokenizer(path, manifest), int(manifest["max_seq_len"])
            for corpus in args.corpora.split(","):
                train, long_train, n_train = long_documents(corpus, "train", tok, max_seq_len, args.max_tokens,
                                                            args.train, args.seed)
                test, long_test, n_test = long_documents(corpus, "test", tok, max_seq_len, args.max_tokens,
                                                         args.test, args.seed + 1)
                texts = [t for t, _, _ in train + test]
                row = {"model": model, "corpus": corpus, "max_seq_len": max_seq_len,
                       "train_docs": len(train), "test_docs": len(test),
                       "long_share_test": round(long_test / n_test, 3),
                       "mean_tokens": round(float(np.mean([n for _, _, n in train + test])), 1)}
                for policy in POLICIES:
                    vectors, seconds, tokens = embed(server.base_url, model, texts, policy)
                    x_train, x_test = vectors[: len(train)], vectors[len(train):]
                    y_train, y_test = [label for _, label, _ in train], [label for _, label, _ in test]
                    row[policy] = {"probe": round(probe_accuracy(x_train, y_train, x_test, y_test), 4),
                                   "knn": round(knn_accuracy(x_train, y_train, x_test, y_test), 4),
                                   "docs_per_s": round(len(texts) / seconds, 2), "seconds": round(seconds, 1),
                                   "tokens_per_doc": round(tokens / len(texts), 1)}
                    print(json.dumps({"model": model, "corpus": corpus, "policy": policy, **row[policy]}), flush=True)
                rows.append(row)
    report = {"date": started.date().isoformat(), "commit": code_version(), "cpu": cpu_model(), "isa": isa(),
              "settings": {"window_overlap": "32 (default)", "max_windows_per_input": 64, "clients": CLIENTS,
                           "docs_per_request": PER_REQUEST, "knn_k": K, "max_tokens": args.max_tokens},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.write_text(markdown(report, " ".join(["python -m bench.long_docs", *argv])))
    print(f"wrote {args.out}")


def markdown(report: dict, command: str) -> str:
    lines = [f"# Long documents: `window` against `truncate` ({report['date']})", "",
             f"Command: `{command}`; commit {report['commit']}; {report['cpu']} ({isa_text(report['isa'])}).", "",
             "| model | corpus | docs train / test | mean tokens | probe truncate → window | kNN truncate → window "
             "| docs/s truncate → window | model tokens per doc truncate → window |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        t, w = r["truncate"], r["window"]
        lines.append(f"| {r['model']} | {r['corpus']} | {r['train_docs']} / {r['test_docs']} | {r['mean_tokens']} "
                     f"| {t['probe']:.3f} → {w['probe']:.3f} | {t['knn']:.3f} → {w['knn']:.3f} "
                     f"| {t['docs_per_s']} → {w['docs_per_s']} | {t['tokens_per_doc']} → {w['tokens_per_doc']} |")
    lines += ["", f"Settings: {json.dumps(report['settings'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
