"""What a batch costs on this CPU: a fixed part per run and a part per padded token.

    python -m bench.batch_cost --model minilm

One session as the server's batch instances run it (``session_options``, single-threaded by default),
fed synthetic token ids at several batch shapes, each shape's best of five rounds of five runs. A
least-squares line through (padded tokens, seconds) gives the fixed cost of a run and the cost of a
token; their ratio is how many tokens of padding a batch may carry before sharing it costs more
than running apart. This is the figure behind the CPU default of ``max_padding_ratio``
(service/settings.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python bench/batch_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procstat  # noqa: E402
from bench.workloads import load_manifest  # noqa: E402
from service.backends.onnx import session_options  # noqa: E402

SHAPES = [(1, 4), (1, 16), (1, 40), (4, 10), (1, 64), (2, 40), (8, 40), (16, 16)]


def feeds(input_names: list[str], batch: int, tokens: int) -> dict[str, np.ndarray]:
    ids = np.full((batch, tokens), 1000, dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    arrays = {"input_ids": ids, "attention_mask": np.ones((batch, tokens), np.int64),
              "token_type_ids": np.zeros((batch, tokens), np.int64)}
    return {name: arrays[name] for name in input_names}


def measure(model_file: str, input_names: list[str], output: str, threads: int, rounds: int = 5) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(model_file, session_options(threads), providers=["CPUExecutionProvider"])
    best: dict[tuple[int, int], float] = {}
    for _ in range(rounds):  # shapes alternate, so a drifting machine touches them all alike
        for shape in SHAPES:
            batch = feeds(input_names, *shape)
            session.run([output], batch)
            began = time.perf_counter()
            for _ in range(5):
                session.run([output], batch)
            best[shape] = min(best.get(shape, float("inf")), (time.perf_counter() - began) / 5)
    tokens = np.array([b * t for b, t in SHAPES], dtype=float)
    seconds = np.array([best[s] for s in SHAPES])
    per_token, fixed = np.polyfit(tokens, seconds, 1)
    return {"shapes": [{"batch": b, "tokens": t, "ms": best[(b, t)] * 1e3} for b, t in SHAPES],
            "fixed_ms": fixed * 1e3, "per_token_ms": per_token * 1e3,
            "fixed_in_tokens": fixed / per_token if per_token > 0 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--store", default="model_store")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1, as a batch instance)")
    args = p.parse_args(argv)
    if not 1 <= args.threads <= 256:
        p.error("--threads must be in [1, 256]")
    path, manifest = load_manifest(Path(args.store).resolve(), args.model)
    if manifest.get("format") != "onnx":
        p.error(f"{args.model!r} is {manifest.get('format')}; this measures ONNX variants")
    result = measure(str(path / manifest["model_file"]), [i["name"] for i in manifest["inputs"]],
                     manifest["outputs"][0]["name"], args.threads)
    print(f"{args.model} ({manifest.get('precision')}), {args.threads} thread(s); {os.cpu_count()} cores "
          f"{procstat.cpu_model()}, {procstat.isa_text(procstat.isa())}")
    print("| batch x tokens | ms per run | ms per padded token |\n|---|---|---|")
    for row in result["shapes"]:
        print(f"| {row['batch']} x {row['tokens']} | {row['ms']:.2f} | {row['ms'] / (row['batch'] * row['tokens']):.3f} |")
    fixed_tokens = result["fixed_in_tokens"]
    print(f"\nfixed cost of a run: {result['fixed_ms']:.2f} ms; per padded token: {result['per_token_ms']:.3f} ms; "
          f"the fixed cost is worth {fixed_tokens:.1f} tokens" if fixed_tokens is not None else "")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
