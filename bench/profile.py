"""Flame graphs of the server under load: py-spy samples a running ``bertserve`` with native frames.

    python -m bench.profile --workload short --concurrency 1 --duration 20 --out bench/reports/flame-short-c1.svg

Starts ``bertserve`` on the store as bench.run does (settings from the environment plus ``--env``), drives
one bench.run cell at it (closed loop, ``--concurrency`` workers) and, during the cell's measured window,
records the server with ``py-spy record --native --threads`` (Python frames, and the C/C++ frames of
ONNX Runtime, tokenizers and the interpreter beneath them; one tower per thread: the event loop,
the batch workers, ONNX Runtime's pool threads). Writes the SVG, and next to it a Markdown note with
the command, the machine and the cell's throughput and latencies while it was recorded: sampling costs
the server some CPU, so those are a little below an unprofiled run's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/profile.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procstat  # noqa: E402
from bench.run import code_version  # noqa: E402
from bench.servers import HOST, ServerProcess, bertserve_argv, child_env, free_port, parse_env  # noqa: E402
from bench.workloads import build_workloads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--store", default="model_store")
    p.add_argument("--workload", default="short", choices=("short", "mixed16"))
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=20.0, help="seconds recorded (default: 20)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before recording (default: 5)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default: 250)")
    p.add_argument("--out", required=True, help="the SVG; a Markdown note goes next to it")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="extra bertserve environment")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 1024 or not 1 <= args.duration <= 600 or not 1 <= args.rate <= 1000:
        p.error("--concurrency in [1, 1024], --duration in [1, 600] s, --rate in [1, 1000]")
    args.env = parse_env(args.env, p.error)
    return args


def py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    if found.exists():
        return str(found)
    which = shutil.which("py-spy")
    if which is None:
        raise SystemExit("error: py-spy is not installed (pip install py-spy; `make venv` installs it)")
    return which


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    store = Path(args.store).resolve()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workload = build_workloads(store, args.model, 0)[args.workload]
    payloads = loadgen.openai_payloads(workload.requests, args.model)
    port = free_port()
    env = child_env({"BERTSERVE_MODEL_STORE": str(store), "BERTSERVE_HOST": HOST, **args.env,
                     "BERTSERVE_PORT": str(port)})
    server = ServerProcess("bertserve", bertserve_argv(), env, port, REPO)
    spy = py_spy()
    with server:
        cell: dict = {}
        # The cell runs in a thread; py-spy starts once the warm-up is over and records the window.
        loader = threading.Thread(target=lambda: cell.update(loadgen.run_cell(
            server.base_url, "/v1/embeddings", payloads, args.concurrency, args.duration, args.warmup, 30.0,
            server.pid, args.duration)))
        loader.start()
        time.sleep(args.warmup)
        record = [spy, "record", "--native", "--threads", "--rate", str(args.rate),
                  "--duration", str(int(args.duration)), "--format", "flamegraph", "--output", str(out),
                  "--pid", str(server.pid)]
        done = subprocess.run(record, capture_output=True, text=True, timeout=args.duration + 120)
        loader.join()
    if done.returncode != 0:
        print(f"error: py-spy failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return 1
    lat = cell.get("latency_ms", {})
    shown = ["python -m bench.profile", *(argv if argv is not None else sys.argv[1:])]
    note = [
        f"# Flame graph: `{args.workload}` at concurrency {args.concurrency}",
        "",
        f"- **File**: [{out.name}]({out.name}) (open it in a browser: it zooms and searches)",
        f"- **Date**: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- **Command**: `{' '.join(shown)}`",
        f"- **Code**: {code_version()}",
        f"- **Recorder**: `{' '.join(Path(record[0]).name if i == 0 else a for i, a in enumerate(record))}`",
        f"- **Machine**: {os.cpu_count()} cores ({procstat.cpu_model()}; {procstat.isa_text(procstat.isa())}), "
        f"{platform.platform()}",
        f"- **Model**: `{args.model}`; bertserve environment: "
        + (", ".join(f"`{k}={v}`" for k, v in args.env.items()) or "defaults"),
        f"- **While recorded** (sampling costs the server some CPU): {cell.get('texts_per_s', 0):.1f} texts/s, "
        f"p50 {lat.get('p50') or 0:.1f} ms, p99 {lat.get('p99') or 0:.1f} ms, server "
        f"{cell.get('server_cpu_cores') or 0:.2f} cores (event-loop thread "
        f"{cell.get('server_main_thread_cores') or 0:.2f}), errors {cell.get('errors')}",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(note))
    print("\n".join(note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
