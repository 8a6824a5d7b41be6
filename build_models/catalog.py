"""Looking at the store: a table of every variant, and a Markdown report with a quality/speed plot."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from build_models.publish import iter_variants
from service.manifest import Manifest, ManifestError, load_manifest, verify_files

COLUMNS = ("name", "ver", "format", "precision", "MB", "metric", "value", "retention", "mean cos",
           "held-out", "b1 ms", "b32x128 ms", "speedup", "status")


def held_out_retention(quality) -> float | None:
    """The held-out corpus's retention as gated: the worse of its probe and its kNN vote."""
    h = quality.held_out if quality else None
    values = [v for v in (h.retention, h.knn_retention) if v is not None] if h else []
    return min(values) if values else None


def gated_retention(quality) -> float | None:
    """Quality kept as the gate sees it: the worse of the first corpus and the held-out one."""
    values = [v for v in (quality.retention, held_out_retention(quality)) if v is not None] if quality else []
    return min(values) if values else None


def _rows(store: Path, verify: bool) -> list[tuple[Manifest | None, dict[str, str]]]:
    rows = []
    for name, version, path in iter_variants(store):
        try:
            m = load_manifest(path)
            status = "ok"
            if verify:
                verify_files(path, m)
                status = "verified"
        except ManifestError as exc:
            rows.append((None, {"name": name, "ver": str(version), "status": f"BROKEN: {exc}"}))
            continue
        q, lat = m.quality, (m.latency.cases if m.latency else {})
        b1, b32 = lat.get("batch1_short", {}), lat.get("batch32_seq128", {})
        rows.append((m, {
            "name": m.name, "ver": str(m.version), "format": m.format, "precision": m.precision,
            "MB": f"{sum(f.size_bytes for f in m.files.values()) / 1e6:.1f}",
            "metric": q.metric if q else "-",
            "value": _num(q.value if q else None),
            "retention": _num(q.retention if q else None),
            "mean cos": _num(q.extra.get("mean_cosine") if q else None),
            "held-out": (f"{_num(held_out_retention(q))} {q.held_out.dataset}" if q and q.held_out else "-"),
            "b1 ms": _num(b1.get("variant"), 2), "b32x128 ms": _num(b32.get("variant"), 1),
            "speedup": (f"{b32['speedup']:.2f}x" if b32.get("speedup") else "-")
                       + (f" ({b32['speedup_vs_baseline']:.2f}x vs {m.latency.baseline})"
                          if b32.get("speedup_vs_baseline") else ""),
            "status": status if not (q and q.note) else f"{status} ({q.note})",
        }))
    return rows


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(store: Path, verify: bool = False) -> str:
    rows = [r for _, r in _rows(store, verify)]
    if not rows:
        return f"no variants in {store}"
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines.append("  ".join("-" * widths[c] for c in COLUMNS))
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_table(store: Path) -> str:
    rows = [r for _, r in _rows(store, verify=False)]
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join("| " + " | ".join(r.get(c, "") for c in COLUMNS) + " |" for r in rows) + "\n"


def embedding_types_markdown(manifests: list[Manifest]) -> str:
    """Per embedding variant: what float32, int8, uint8 and binary vectors cost against the fp32 reference."""
    parts = []
    for m in manifests:
        table = m.quality.embedding_types if m.quality else None
        if table is None:
            continue
        k = table.k
        lines = [f"### {m.name} v{m.version} ({m.format} {m.precision})\n",
                 f"| type | bytes / vector | R8 probe acc. | probe retention | recall@{k} | "
                 f"recall@{k}, top {table.rescore_candidates} rescored by float |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.type} | {r.bytes_per_vector} | {_num(r.probe_accuracy)} | {_num(r.probe_retention)} | "
                  f"{_num(r.recall_at_k)} | {_num(r.recall_at_k_rescored)} |" for r in table.rows]
        parts.append("\n".join(lines) + "\n")
    if not parts:
        return ""
    head = ("\n## Embedding types\n\nWhat `embedding_type` costs, against the fp32 reference's float vectors: "
            "the R8 probe trained on each type's vectors, and recall@10 of the test texts over the probe texts "
            "(int8/uint8 ranked by integer dot product, binary by Hamming distance; ubinary is the same bits as "
            "binary); rescored: each type's own top candidates reordered by the float vectors.\n\n")
    return head + "\n".join(parts)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def family_of(m: Manifest) -> str:
    """The recipe family a variant came from; manifests from before the field by their recipe file."""
    if m.family:
        return m.family
    recipe = (m.lineage.recipe or "").split(" ")[0]
    return Path(recipe).stem or "store"


def plot_family(family: str, manifests: list[Manifest], path: Path) -> bool:
    """One family's variants as quality retention against batch-32 throughput, Pareto front marked.
    False (no file) when no variant has both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference_tp = []
    points: list[tuple[float, float]] = []
    for m in manifests:
        b32 = (m.latency.cases.get("batch32_seq128") if m.latency else None) or {}
        retention = gated_retention(m.quality)
        if not b32.get("variant") or retention is None:
            continue
        throughput = 32 / (b32["variant"] / 1000)
        reference_tp.append(32 / (b32["reference"] / 1000))
        points.append((throughput, retention))
        ax.scatter(throughput, retention, s=40)
        ax.annotate(f"{m.name} v{m.version}\n({m.format} {m.precision})", (throughput, retention),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    if not points:
        plt.close(fig)
        return False
    front = pareto_front(points)
    # The trade-offs worth having: nothing else is both faster and better.
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", alpha=0.6,
            drawstyle="steps-post", label="Pareto front")
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=110, facecolors="none",
               edgecolors="tab:red")
    ax.legend(loc="lower left", fontsize=8)
    ref = sorted(reference_tp)[len(reference_tp) // 2]
    ax.scatter([ref], [1.0], marker="*", s=120, color="black")
    ax.annotate("PyTorch fp32 reference", (ref, 1.0), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("throughput, sequences/s (batch 32 x 128 tokens, build machine)")
    ax.set_ylabel("quality retention vs fp32 reference (worse domain)")
    ax.set_title(f"{family}: quality kept vs speed, every variant in the store")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(store: Path, out_dir: Path) -> Path:
    """Markdown report plus one PNG per family of quality retention against batch-32 throughput."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests = [m for m, _ in _rows(store, verify=False) if m is not None]
    families: dict[str, list[Manifest]] = {}
    for m in manifests:
        families.setdefault(family_of(m), []).append(m)
    plots = [(family, out_dir / f"{family}-variants.png") for family in sorted(families)]
    plots = [(family, path) for family, path in plots if plot_family(family, families[family], path)]
    report = out_dir / "report.md"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = ["# Model store report\n", f"Store: `{store}` · generated {now}\n",
            *(f"## {family}\n\n![{family}: quality vs throughput]({path.name})\n" for family, path in plots),
            "## Every variant\n", markdown_table(store)]
    fused = [(m.name, m.version, m.fused_nodes) for m in manifests if m.fused_nodes]
    if fused:
        body.append("\n## Fused ONNX Runtime nodes\n")
        body += [f"- {n} v{v}: " + ", ".join(f"{k} {c}" for k, c in f.items()) for n, v, f in fused]
    body.append(embedding_types_markdown(manifests))
    report.write_text("\n".join(body) + "\n")
    return report
