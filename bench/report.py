"""Markdown from the raw results dict that bench.run writes as JSON."""

from __future__ import annotations

from bench import procstat


def _f(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _cell_lookup(results: dict, server: str, workload: str, concurrency: int) -> dict | None:
    for cell in results.get("cells", []):
        if cell["server"] == server and cell["workload"] == workload and cell.get("concurrency") == concurrency:
            return cell
    return None


def render(results: dict) -> str:
    meta = results["meta"]
    out: list[str] = ["# bertserve serving benchmark", ""]
    out += [f"- **Date**: {meta['date']}",
            f"- **Command**: `{meta['command']}`",
            f"- **Machine**: {meta['nproc']} cores ({meta['cpu_model']}; {procstat.isa_text(meta)}), "
            f"{meta['mem_gib']} GiB RAM, {meta['platform']}",
            f"- **Software**: Python {meta['python']}, " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
            f"- **Code**: {meta.get('code', 'not recorded')}",
            f"- **Load average** (1/5/15 min) before: {meta['loadavg_start']}, after: {meta.get('loadavg_end', '—')} "
            f"(counts waiting tasks too; the CPU actually used by others is the *other cores* column)",
            f"- **Model**: `{meta['model']}` (store `{meta['store']}`, version {meta['model_version']}, "
            f"{meta['model_format']} {meta['model_precision']})",
            f"- **Cells**: closed loop; each measures {meta['duration_s']} s after a warm-up of {meta['warmup_s']} s "
            f"(the warm-up lasts until every worker has had an answer; the window stretches to 3 of the slowest "
            f"warm-up latencies, at most {meta.get('max_window_s', '—')} s: column *s*), "
            f"concurrency {', '.join(map(str, meta['concurrency']))}; request timeout {meta['timeout_s']} s; "
            f"seed {meta['seed']}", ""]
    noisy = [c for c in results.get("cells", []) if c.get("ok") and (c.get("other_cpu_cores") or 0) > 0.25]
    if noisy:
        worst = max(c["other_cpu_cores"] for c in noisy)
        out += [f"> **Noise**: other processes on this machine used CPU during {len(noisy)} of "
                f"{len(results['cells'])} cells (up to {worst:.2f} cores; column *other cores*). With "
                f"{meta['nproc']} cores that competes directly with the server: treat those rows as lower bounds.", ""]
    else:
        out += ["> Other processes used at most 0.25 cores during every cell (column *other cores*).", ""]

    out += ["## Servers", ""]
    for name, info in results.get("servers", {}).items():
        out.append(f"- **{name}**: {info['description']}")
        if info.get("startup_s") is not None:
            out[-1] += f" Started in {info['startup_s']:.1f} s."
        for r in info.get("restarts", []):
            out.append(f"  - **died** (exit code {r['exit_code']}; -15 is a SIGTERM from outside the bench) and was "
                       f"restarted at {r['at']}: cells after it ran on a fresh process")
        if info.get("error"):
            lines = [ln.strip() for ln in info["error"].splitlines()
                     if ln.strip() and not ln.strip().startswith("For further information")]
            out.append(f"  - **failed**: {lines[0]}" + (f" … `{lines[-1]}`" if len(lines) > 1 else ""))
    settings = results.get("bertserve_settings")
    if settings:
        keys = ["max_batch_size", "max_batch_tokens", "max_queue_delay_ms", "max_padding_ratio", "max_queue_items",
                "intra_op_threads", "instances_per_model", "solo_batch_threads", "tokenizer_threads",
                "request_timeout_s", "version_policy", "device", "access_log"]
        out.append("- **bertserve settings**: " + ", ".join(f"`{k}={settings.get(k)}`" for k in keys if k in settings)
                   + (f"; overrides from `--env`: {results['meta']['env']}" if results["meta"]["env"] else
                      " (all defaults)"))
    out.append("")

    out += ["## Workloads", "", "| workload | requests in pool | texts in pool | texts/request | mean tokens/text "
            "| max tokens/text | what |", "|---|---|---|---|---|---|---|"]
    for w in results["workloads"].values():
        out.append(f"| `{w['name']}` | {w['requests_in_pool']} | {w['texts_in_pool']} | {w['texts_per_request']} | "
                   f"{w['mean_tokens_per_text']} | {w['max_tokens_per_text']} | {w['description']} |")
    out += ["", "Requests go to the OpenAI route `POST /v1/embeddings` (`{\"input\": ..., \"model\": ...}`) of both "
            "servers; workers walk the pool in order, cycling when it runs out.", ""]

    out += ["## In-process ceiling", "",
            "The same variant's ONNX graph in this process (onnxruntime, CPU provider, "
            "the server backend's session options), tokenize + infer every text of the pool once in length-sorted "
            "batches, padded per batch. No HTTP, no JSON. Two arrangements of the cores, alternated twice, each "
            "keeping its better pass: one session with a thread per core, and one single-threaded session per "
            "core, each in its own thread taking the next batch; the faster is the ceiling (*texts/s*) the tables "
            "below compare with, and the arrangement measured again next to each cell. The last pass takes "
            "batches of the same size in pool order, unsorted, with the winner, to show what padding costs "
            "(padding = padded tokens / real tokens).", "",
            "| workload | texts | batch | arrangement (the faster) | texts/s of each arrangement | seconds "
            "| texts/s (ceiling) | padding | unsorted texts/s | unsorted padding |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in results.get("ceiling", {}).items():
        if c.get("ok"):
            real = c["real_tokens"] or 1
            each = "; ".join(f"{k}: {v:.1f}" for k, v in c.get("arrangements", {}).items())
            out.append(f"| `{name}` | {c['texts']} | {c['batch_size']} | {c.get('arrangement', '')} | {each} | "
                       f"{c['elapsed_s']:.2f} | {c['texts_per_s']:.1f} | {c['padded_tokens_sorted'] / real:.2f}x | "
                       f"{c['texts_per_s_unsorted']:.1f} | {c['padded_tokens_unsorted'] / real:.2f}x |")
        else:
            out.append(f"| `{name}` | failed: {c.get('error')} | | | | | | | | |")
    out.append("")

    servers = list(results.get("servers", {}))
    for wname in results["workloads"]:
        ceiling = results.get("ceiling", {}).get(wname, {})
        cmax = ceiling.get("texts_per_s") if ceiling.get("ok") else None
        out += [f"## Workload `{wname}`", "",
                "| server | concurrency | s | texts/s | requests/s | p50 ms | p90 ms | p99 ms | errors | server cores "
                "| main thread | client cores | other cores | ceiling texts/s | of ceiling | vs plain |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for server in servers:
            for conc in meta["concurrency"]:
                cell = _cell_lookup(results, server, wname, conc)
                if cell is None:
                    continue
                if not cell.get("ok"):
                    out.append(f"| {server} | {conc} | | failed: {cell.get('error', '?')} | | | | | | | | | | | | |")
                    continue
                lat = cell["latency_ms"]
                errs = str(cell["errors"])
                if cell["errors"]:
                    errs += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(cell["errors_by_status"].items())) + ")"
                # The ceiling measured just before this cell when there is one (the machine drifts), else the
                # run's first measurement; the plain server is not compared with it.
                cref = cell.get("adjacent_ceiling") or cmax
                frac = _f(100 * cell["texts_per_s"] / cref, 0, "%") if cref else "—"
                plain = _cell_lookup(results, "plain", wname, conc)
                vs = "—"
                if server != "plain" and plain and plain.get("ok") and plain["texts_per_s"] > 0:
                    vs = f"{cell['texts_per_s'] / plain['texts_per_s']:.2f}x"
                out.append(f"| {server} | {conc} | {cell['duration_s']:.0f} | {_f(cell['texts_per_s'])} | {_f(cell['requests_per_s'])} | "
                           f"{_f(lat['p50'])} | {_f(lat['p90'])} | {_f(lat['p99'])} | {errs} | "
                           f"{_f(cell['server_cpu_cores'], 2)} | {_f(cell.get('server_main_thread_cores'), 2)} | "
                           f"{_f(cell['client_cpu_cores'], 2)} | "
                           f"{_f(cell['other_cpu_cores'], 2)} | {_f(cref)} | {frac} | {vs} |")
        out.append("")

    out += ["## How to read this", "",
            "- **Closed loop**: each of *concurrency* workers sends its next request as soon as the previous answer "
            "arrives (one keep-alive connection per worker, `bench/rawhttp.py` on uvloop: a few hundred microseconds of "
            "CPU per request, where httpx took about 4 ms). A request counts when its answer "
            "arrives inside the measured window; texts/s and requests/s count only 200 answers with the right "
            "number of embeddings; latency percentiles (nearest rank) are over those. Requests still in flight at "
            "the end are awaited (not counted) before the next cell starts. Both servers run for the whole run and "
            "their cells alternate (bertserve, then plain, at each workload and concurrency), so the two sides of a "
            "ratio are measured under the same conditions.",
            "- **errors**: non-200 answers, malformed bodies, timeouts and connection errors in the window.",
            "- **server cores**: the server process's CPU time (utime+stime from `/proc/<pid>/stat`) over the "
            "window divided by its length; **main thread**: the same for the server's main thread alone, which runs its "
            "event loop (HTTP parsing, JSON, validation; tokenization and inference run on other threads in bertserve): "
            "close to 1.00 means the loop is saturated. **client cores**: the same for this load generator, which runs on the same "
            "machine and competes for the same cores. **other cores**: the whole machine's busy time (`/proc/stat`) "
            "minus both: anything else running (noise).",
            "- **ceiling texts/s**, **of ceiling**: texts/s as a share of the in-process ceiling for the same "
            "workload (the bertserve variant's ONNX graph). For bertserve cells the ceiling is measured again (one sorted "
            "pass) just before the cell, because these shared machines drift by tens of "
            "percent within minutes; the plain server's cells use the first measurement above, although it runs fp32 PyTorch, so "
            "that column says how far it is from what this machine can do with the served variant.",
            "- **vs plain**: texts/s divided by the plain server's texts/s at the same workload and concurrency.",
            "- Timings are measurements of one run on one machine, never assertions; the raw numbers are in the JSON "
            "file next to this report.", ""]
    return "\n".join(out)


if __name__ == "__main__":  # re-render a report from its JSON: python -m bench.report bench/reports/serving.json
    import json
    import sys
    from pathlib import Path

    src = Path(sys.argv[1])
    src.with_suffix(".md").write_text(render(json.loads(src.read_text())))
    print(f"wrote {src.with_suffix('.md')}")
