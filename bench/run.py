"""Serving benchmark: bertserve vs a plain per-request server vs the in-process ceiling.

    python -m bench.run --model minilm --duration 20 --concurrency 1,8,32 --out bench/reports/serving.md

Writes a Markdown report and the raw JSON next to it. Measures; never asserts timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procstat  # noqa: E402
from bench.ceiling import Ceiling  # noqa: E402
from bench.report import render  # noqa: E402
from bench.servers import HOST, ServerProcess, bertserve_argv, child_env, free_port, parse_env  # noqa: E402
from bench.workloads import build_workloads, load_manifest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLAIN_DESCRIPTION = ("`bench/plain_server.py`: FastAPI, one sync route `POST /v1/embeddings` calling "
                     "`SentenceTransformer(all-MiniLM-L6-v2).encode(texts)` per request (fp32 PyTorch, no batching "
                     "across requests; FastAPI's thread pool runs concurrent requests side by side), uvicorn, one "
                     "worker. It serves the same model whatever `model` says.")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="variant to serve and request (default: minilm)")
    p.add_argument("--store", default="model_store", help="model store directory (default: model_store)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per cell (default: 20)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="uncounted seconds before each cell, extended until every worker has had an answer (default: 3)")
    p.add_argument("--max-window", type=float, default=None,
                   help="a cell measures at least 3 of its slowest warm-up latencies, up to this many seconds "
                        "(default: 4 x duration)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated worker counts (default: 1,8,32)")
    p.add_argument("--workloads", default="short,mixed16", help="comma-separated (default: short,mixed16)")
    p.add_argument("--out", default="bench/reports/serving.md", help="Markdown report; JSON goes next to it")
    p.add_argument("--port", type=int, default=0, help="bertserve port (default: a free one)")
    p.add_argument("--plain-port", type=int, default=0, help="plain server port (default: a free one)")
    p.add_argument("--skip-plain", action="store_true", help="don't run the plain per-request server")
    p.add_argument("--skip-ceiling", action="store_true", help="don't measure the in-process ceiling")
    p.add_argument("--no-adjacent-ceiling", dest="adjacent_ceiling", action="store_false",
                   help="don't measure the in-process ceiling again before each bertserve cell (one sorted pass "
                        "over the pool, so that the cell's share of the ceiling compares numbers taken seconds apart)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="extra environment for bertserve, e.g. --env BERTSERVE_MAX_QUEUE_DELAY_MS=5 (repeatable)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default: 30)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-requests", type=int, default=96, help="requests in the mixed16 pool (default: 96)")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency takes comma-separated integers, e.g. 1,8,32")
    if not args.concurrency or min(args.concurrency) < 1 or max(args.concurrency) > 1024:
        p.error("--concurrency values must be between 1 and 1024")
    if not 0 < args.duration <= 3600 or not 0 <= args.warmup <= 600:
        p.error("--duration must be in (0, 3600] and --warmup in [0, 600]")
    args.env = parse_env(args.env, p.error)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    return args


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("bertserve", "onnxruntime", "torch", "sentence-transformers", "fastapi", "uvicorn", "httpx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def code_version() -> str:
    """The commit the run measured, and whether service/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return f"{head} ({'service/ with uncommitted changes' if dirty else 'service/ clean'})"


def _loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _bertserve_settings(env: dict[str, str]) -> dict | None:
    """The settings the server will read, computed the way it computes them (its own process, same env)."""
    code = "from service.settings import ServiceSettings; print(ServiceSettings().model_dump_json())"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 else None
    except (subprocess.SubprocessError, json.JSONDecodeError, OSError):
        return None


def _write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.write_text(render(results))


def start_server(name: str, server: ServerProcess, results: dict, out: Path) -> bool:
    info = results["servers"][name]
    info["port"] = server.port
    log(f"starting {name} on {server.base_url} (log {server.log_path})")
    try:
        server.start()
    except Exception as exc:
        info["error"] = str(exc)
        log(f"{name} failed to start: {exc}")
        _write(results, out)
        return False
    info["startup_s"] = server.startup_s
    log(f"{name} healthy after {server.startup_s:.1f} s")
    return True


def stop_server(name: str, server: ServerProcess, results: dict) -> None:
    code = server.stop()
    info = results["servers"][name]
    info["exit_code"] = code
    if code not in (0, None, -15):
        info["log_tail"] = server.log_tail()
    log(f"{name} stopped (exit code {code})")


def _adjacent_ceiling(ceiling: Ceiling, workload, arrangement: str | None):
    """A thunk measuring the ceiling now, in the arrangement that won for the workload (None when it
    fails: the cell then uses the first ceiling)."""

    def measure() -> float | None:
        try:
            return ceiling.measure_sorted(workload.texts, workload.tokens, arrangement)["texts_per_s"]
        except Exception as exc:
            log(f"adjacent ceiling failed: {type(exc).__name__}: {exc}")
            return None

    return measure


MAX_RESTARTS = 3


def _revive(name: str, server: ServerProcess, results: dict) -> str | None:
    """Restart a server that died between cells (bounded); None when it runs again, else why not."""
    info = results["servers"][name]
    restarts = info.setdefault("restarts", [])
    code = server.proc.returncode
    if len(restarts) >= MAX_RESTARTS:
        return f"{name} exited with code {code} (no restarts left)"
    log(f"{name} exited with code {code}; restarting ({len(restarts) + 1}/{MAX_RESTARTS})")
    restarts.append({"at": dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S UTC"), "exit_code": code,
                     "log_tail": server.log_tail(8)})
    try:
        server.start()
    except Exception as exc:
        return f"{name} exited with code {code} and did not restart: {str(exc).splitlines()[0]}"
    return None


def run_one_cell(name: str, server: ServerProcess, started: bool, wname: str, conc: int, payloads: dict,
                 args, results: dict, adjacent=None) -> dict:
    problem = None
    if not started:
        problem = f"{name} did not start"
    elif server.proc.poll() is not None:
        problem = _revive(name, server, results)
    ceiling_now = None
    if problem:
        cell = {"ok": False, "concurrency": conc, "error": problem}
    else:
        ceiling_now = adjacent() if adjacent else None
        cell = loadgen.run_cell(server.base_url, "/v1/embeddings", payloads[wname], conc, args.duration,
                                args.warmup, args.timeout, server.pid, args.max_window)
        if ceiling_now is not None:
            cell["adjacent_ceiling"] = ceiling_now
    cell.update(server=name, workload=wname)
    if cell.get("ok"):
        lat = cell["latency_ms"]
        share = f" ({cell['texts_per_s'] / ceiling_now:.0%} of {ceiling_now:.0f} in-process)" if ceiling_now else ""
        log(f"{name} {wname} c={conc}: {cell['texts_per_s']:.1f} texts/s{share} over {cell['duration_s']:.0f} s, "
            f"p50 {lat['p50'] or 0:.1f} ms, p99 {lat['p99'] or 0:.1f} ms, errors {cell['errors']}, "
            f"server {cell['server_cpu_cores'] or 0:.2f} cores, other {cell['other_cpu_cores'] or 0:.2f}")
    elif started:
        log(f"{name} {wname} c={conc}: FAILED {cell.get('error')}")
    return cell


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    store = Path(args.store).resolve()
    out = Path(args.out)
    path, manifest = load_manifest(store, args.model)
    workloads = {k: v for k, v in build_workloads(store, args.model, args.seed, args.mixed_requests).items()
                 if k in args.workloads}
    unknown = set(args.workloads) - set(workloads)
    if unknown:
        print(f"error: unknown workload(s) {sorted(unknown)}; known: short, mixed16", file=sys.stderr)
        return 2
    results: dict = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": shlex.join([sys.executable, "-m", "bench.run",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "nproc": os.cpu_count(), "cpu_model": procstat.cpu_model(), **procstat.isa(),
            "mem_gib": procstat.mem_total_gib(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": _versions(),
            "code": code_version(), "loadavg_start": _loadavg(), "model": args.model, "store": str(store),
            "model_version": int(path.name), "model_format": manifest.get("format"),
            "model_precision": manifest.get("precision"), "duration_s": args.duration, "warmup_s": args.warmup,
            "max_window_s": args.max_window if args.max_window is not None else 4 * args.duration,
            "concurrency": args.concurrency, "timeout_s": args.timeout, "seed": args.seed, "env": args.env,
        },
        "workloads": {k: w.summary() for k, w in workloads.items()},
        "ceiling": {}, "servers": {}, "cells": [],
    }
    payloads = {k: loadgen.openai_payloads(w.requests, args.model) for k, w in workloads.items()}

    ceiling = None
    if not args.skip_ceiling:
        try:
            ceiling = Ceiling(store, args.model)
            for wname, w in workloads.items():
                log(f"in-process ceiling, {wname}: {len(w.tokens)} texts")
                try:
                    results["ceiling"][wname] = ceiling.measure(w.texts, w.tokens)
                    found = results["ceiling"][wname]
                    log(f"  {found['texts_per_s']:.1f} texts/s ({found['arrangement']}; "
                        + ", ".join(f"{k}: {v:.1f}" for k, v in found["arrangements"].items()) + ")")
                except Exception as exc:
                    results["ceiling"][wname] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            for wname in workloads:
                results["ceiling"][wname] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        _write(results, out)

    bert_env = child_env({"BERTSERVE_MODEL_STORE": str(store), "BERTSERVE_HOST": HOST, **args.env,
                          "BERTSERVE_PORT": str(args.port or free_port())})
    results["bertserve_settings"] = _bertserve_settings(bert_env)
    results["servers"]["bertserve"] = {"description": f"`bertserve` ({' '.join(bertserve_argv())}), settings from "
                                                      f"the environment, serving `{store.name}/`."}
    servers = {"bertserve": ServerProcess("bertserve", bertserve_argv(), bert_env, int(bert_env["BERTSERVE_PORT"]),
                                          REPO, startup_timeout=args.startup_timeout)}
    if not args.skip_plain:
        results["servers"]["plain"] = {"description": PLAIN_DESCRIPTION}
        port = args.plain_port or free_port()
        servers["plain"] = ServerProcess("plain", [sys.executable, "-m", "uvicorn", "bench.plain_server:app",
                                                   "--host", HOST, "--port", str(port), "--log-level", "warning"],
                                         child_env({}), port, REPO, startup_timeout=args.startup_timeout)
    started: dict[str, bool] = {}
    try:
        # Both servers run for the whole run (idle one uses no CPU) and their cells alternate, so that the
        # two sides of each "vs plain" ratio are measured minutes apart at most, under the same conditions.
        for name, server in servers.items():
            started[name] = start_server(name, server, results, out)
        for wname in workloads:
            for conc in args.concurrency:
                for name, server in servers.items():
                    adjacent = None
                    if name == "bertserve" and ceiling is not None and args.adjacent_ceiling:
                        adjacent = _adjacent_ceiling(ceiling, workloads[wname],
                                                     results["ceiling"].get(wname, {}).get("arrangement"))
                    results["cells"].append(run_one_cell(name, server, started[name], wname, conc, payloads, args,
                                                         results, adjacent))
                    _write(results, out)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        results["meta"]["interrupted"] = True
    finally:
        for name, server in servers.items():
            if started.get(name):
                stop_server(name, server, results)
            else:
                server.stop()
        results["meta"]["loadavg_end"] = _loadavg()
        _write(results, out)
    log(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
