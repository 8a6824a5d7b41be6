"""Run a recipe: every variant's steps, its evaluation against the reference, gates, then publish."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.publish import discard, ensure_writable, new_staging_dir, publish
from build_models.recipe import Recipe, VariantConfig, load_recipe
from build_models.sources import resolve_source
from build_models.training.distributed import World

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class VariantOutcome:
    name: str
    published: bool
    version: int | None = None
    path: Path | None = None
    gate_failures: list[str] = field(default_factory=list)
    manifest: object | None = None
    seconds: float = 0.0


@dataclass
class BuildResult:
    outcomes: list[VariantOutcome]

    @property
    def gate_failures(self) -> list[str]:
        return [f"{o.name}: {g}" for o in self.outcomes for g in o.gate_failures]


def _builder_versions() -> dict[str, str]:
    out = {}
    for dist in ("bertserve", "torch", "transformers", "onnxruntime", "onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fallback_sample_texts() -> list[str]:
    return [
        "The central bank raised interest rates by a quarter point on Tuesday.",
        "Shares of the company fell after it reported lower quarterly earnings.",
        "A short one.",
        "Negotiators said the trade talks would resume next week in Geneva after a brief pause.",
        "Oil prices rose as supply concerns grew across the region.",
        "The board approved a two for one stock split and raised the dividend.",
    ]


def _sample_texts(recipe: Recipe) -> list[str]:
    """Real text from the train split (never the evaluation split) for export checks."""
    from build_models.corpora import load_split

    try:
        texts = load_split(recipe.evaluation.dataset, "train").texts
    except BuildError:
        return _fallback_sample_texts()
    return [t for t in texts[:64] if len(t) > 60][:8] or _fallback_sample_texts()


def build(
    recipe_path: str | Path | None,
    store: str | Path = "model_store",
    only: list[str] | None = None,
    allow_below_gate: bool = False,
    log: Log = _stderr,
    recipe: Recipe | None = None,
    world: World | None = None,
    origin: str | None = None,
) -> BuildResult:
    """Build, evaluate, gate and publish the recipe's variants.

    ``recipe_path`` None: ``recipe`` was made in code (``build-models build --source``). ``origin`` says
    how the recipe came about, for the manifests' lineage: instead of the file when there is none, else
    after it (a command-line change to the file's recipe).

    Under torchrun (``world`` of several ranks) every rank runs the training steps together; only
    rank 0 evaluates, exports and publishes, so the store gets each variant once.
    """
    recipe_path = Path(recipe_path) if recipe_path is not None else None
    if recipe is None:
        if recipe_path is None:
            raise ValueError("build() needs a recipe file or a Recipe")
        recipe = load_recipe(recipe_path)
    where = recipe_path or origin or "recipe"
    world = world or World()
    store = Path(store)
    variants = recipe.variants
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise BuildError(f"{where}: no variant named {', '.join(unknown)}; "
                             f"variants: {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in only]
    # Before any heavy work: every rank must train the same thing with the same code.
    world.agree("recipe", {"recipe": recipe.model_dump(), "variants": [v.name for v in variants],
                           "builder": _builder_versions()})
    source = resolve_source(recipe.source, recipe.task, base_dir=recipe_path.parent if recipe_path else None,
                            labels_from_teacher=bool(recipe.teacher))
    if world.is_main:
        ensure_writable(store)

    # Heavy imports only once the cheap checks have passed, so bad input fails fast.
    from transformers import AutoTokenizer

    from build_models.evaluate import Evaluator
    from build_models.modeling import encoder_config, load_reference
    from build_models.reference_cache import ReferenceCache, reference_key

    t0 = time.perf_counter()
    log(f"source {source.path} ({source.model_type}, task {recipe.task})"
        + (f", rank {world.rank} of {world.size}" if world.distributed else ""))
    for note in source.notes:
        log(f"note: {note}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        raise BuildError(f"source {source.path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    max_seq_len = min(recipe.max_seq_len or source.max_seq_len, source.max_seq_len)
    names = ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])
    sample_texts = _sample_texts(recipe)
    from build_models.evaluate import evaluation_texts

    held_out_texts = evaluation_texts(recipe.evaluation)  # what training steps must never read
    work_root = Path(tempfile.mkdtemp(prefix="bertserve-build-"))
    staged: list[tuple[VariantOutcome, Path, dict]] = []
    outcomes: list[VariantOutcome] = []

    def context(name: str, provider: str = "cpu", reference=None) -> BuildContext:
        work = work_root / name
        work.mkdir()
        return BuildContext(source=source, task=recipe.task, tokenizer=tokenizer, work_dir=work,
                            max_seq_len=max_seq_len, provider=provider, sample_texts=sample_texts,
                            checkpoint_dir=store / ".checkpoints", reference=reference, world=world,
                            evaluation_texts=held_out_texts)

    try:
        teacher_records = []
        if recipe.teacher:
            source, teacher_records = _make_teacher(recipe, context(".teacher"), work_root / ".teacher-model", log)
        try:
            reference = load_reference(source.path, recipe.task, source.pooling, source.normalize)
            default_reference = _default_attention_reference(source, recipe.task, log) if world.is_main else None
        except (OSError, ValueError) as exc:
            raise BuildError(f"source {source.path}: cannot load the checkpoint ({str(exc).splitlines()[0]})") from None
        evaluator = None
        if world.is_main:
            log("evaluating the fp32 PyTorch reference on held-out text ...")
            cache = ReferenceCache.in_store(store, reference_key(source, recipe.task, names, recipe.evaluation))
            evaluator = Evaluator(recipe.evaluation, recipe.task, tokenizer, names, reference, source.labels,
                                  default_reference=default_reference, cache=cache, log=log)
            log(f"reference {evaluator.ref_quality.metric} = {evaluator.ref_quality.value} "
                f"({len(evaluator.test)} test / {len(evaluator.train)} train texts) "
                + (f"from the cache ({cache.path})" if evaluator.reference_cached
                   else f"in {time.perf_counter() - t0:.0f}s"))
        recipe_record = _recipe_record(recipe_path, origin)
        prefix_cache: dict[str, tuple] = {}
        timed: dict[str, tuple] = {}  # variant name -> (runner, manifest fields), for the latency probe
        for variant in variants:
            started = time.perf_counter()
            ctx = context(variant.name, variant.provider, reference)
            if not world.is_main:
                # The other ranks only help train; rank 0 exports, evaluates and publishes.
                _run_steps(variant, reference, ctx, log, prefix_cache, training_only=True)
                continue
            outcome = VariantOutcome(name=variant.name, published=False)
            artifact, records = _run_steps(variant, reference, ctx, log, prefix_cache)
            dim_config = ctx.model_config or encoder_config(reference)
            fields = _manifest_fields(recipe, recipe_record, variant, source, artifact,
                                      teacher_records + records, max_seq_len, names, dim_config)
            run = _evaluate_variant(evaluator, recipe, variant, artifact, fields, outcome, log)
            if run is not None:
                timed[variant.name] = (run, fields)
            staging = new_staging_dir(store, variant.name)
            try:
                _stage_files(staging, artifact, tokenizer)
            except BaseException:
                discard(staging)
                raise
            outcome.seconds = time.perf_counter() - started
            outcomes.append(outcome)
            staged.append((outcome, staging, fields))
        if timed:
            _time_variants(evaluator, timed, log, recipe.evaluation.speed_baseline)
        # Publish only after every variant is built: an interrupted run leaves the store as it was.
        for outcome, staging, fields in staged:
            if outcome.gate_failures and not allow_below_gate:
                discard(staging)
                continue
            manifest = publish(store, staging, fields)
            outcome.published, outcome.version, outcome.manifest = True, manifest.version, manifest
            outcome.path = store / manifest.name / str(manifest.version)
            log(f"published {manifest.name} v{manifest.version} -> {outcome.path}")
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
        for outcome, staging, _ in staged:
            if staging.exists():
                discard(staging)
    log(f"build finished in {time.perf_counter() - t0:.0f}s")
    return BuildResult(outcomes)


def _make_teacher(recipe: Recipe, ctx: BuildContext, out_dir: Path, log: Log):
    """Run the recipe's teacher steps (finetune) and return the source as the teacher checkpoint it
    became, plus the steps' records for every variant's lineage."""
    from build_models.steps import STEPS
    from service.manifest import StepRecord

    artifact, records = Artifact(kind="torch", precision="fp32"), []
    for cfg in recipe.teacher:
        t = time.perf_counter()
        artifact, details = STEPS[cfg.step](cfg, artifact, ctx)
        records.append(StepRecord(name=cfg.step, params=cfg.model_dump(exclude={"step"}),
                                  details=_jsonable({"teacher": True, **details})))
        log(f"[teacher] {cfg.step} done in {time.perf_counter() - t:.1f}s")
    classifier = artifact.module.classifier
    classifier.save_pretrained(str(out_dir))
    id2label = classifier.config.id2label
    labels = [id2label[i] for i in sorted(id2label)]
    teacher = dataclasses.replace(ctx.source, path=out_dir, labels=labels, config=classifier.config.to_dict(),
                                  notes=[])
    return teacher, records


def _default_attention_reference(source, task, log: Log):
    from build_models.modeling import load_reference

    try:
        return load_reference(source.path, task, source.pooling, source.normalize, attn_implementation="sdpa")
    except (ValueError, ImportError) as exc:
        log(f"note: no SDPA attention for this model ({str(exc).splitlines()[0]}); timing the eager reference only")
        return None


TRAINING_STEPS = ("distill", "qat", "finetune")


def _run_steps(variant: VariantConfig, reference, ctx: BuildContext, log: Log, cache: dict,
               training_only: bool = False):
    """Run the variant's steps, reusing the ONNX files of a step prefix another variant already ran.

    Variants often share ``export_onnx, optimize``; only file-based (ONNX) artifacts are reused,
    since they are never modified in place. ``training_only``: stop after the last training step
    (what the other ranks of a torchrun world do).
    """
    from build_models.steps import STEPS
    from service.manifest import StepRecord

    keys = [json.dumps([c.model_dump() for c in variant.steps[: i + 1]], sort_keys=True)
            for i in range(len(variant.steps))]
    start = 0
    for i in reversed(range(len(keys))):
        if keys[i] in cache:
            artifact, records, ctx.torch_model, ctx.model_config = cache[keys[i]]
            records = list(records)
            start = i + 1
            log(f"[{variant.name}] reusing {', '.join(r.name for r in records)} from an earlier variant")
            break
    else:
        artifact = Artifact(kind="torch", precision="fp32", module=copy.deepcopy(reference))
        records = []
    end = len(variant.steps)
    if training_only:
        trained = [i for i, c in enumerate(variant.steps) if c.step in TRAINING_STEPS]
        end = trained[-1] + 1 if trained else 0
    for index in range(start, end):
        cfg = variant.steps[index]
        if cfg.step.startswith("export_") and artifact.kind == "torch":
            ctx.torch_model = artifact.module if artifact.precision == "fp32" else ctx.torch_model
            ctx.model_config = getattr(getattr(artifact.module, "encoder", None) or
                                       getattr(artifact.module, "classifier", None), "config", None)
        t = time.perf_counter()
        artifact, details = STEPS[cfg.step](cfg, artifact, ctx)
        params = cfg.model_dump(exclude={"step"})
        records.append(StepRecord(name=cfg.step, params=params, details=_jsonable(details)))
        log(f"[{variant.name}] {cfg.step} done in {time.perf_counter() - t:.1f}s")
        if artifact.kind == "onnx":
            cache[keys[index]] = (artifact, list(records), ctx.torch_model, ctx.model_config)
    return artifact, records


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _recipe_record(recipe_path: Path | None, origin: str | None) -> str:
    """The manifest lineage's ``recipe``: the file and its sha256, and/or how the recipe was made."""
    if recipe_path is None:
        return origin or "recipe made in code"
    digest = hashlib.sha256(recipe_path.read_bytes()).hexdigest() if recipe_path.is_file() else None
    return f"{recipe_path}" + (f" sha256:{digest}" if digest else "") + (f"; {origin}" if origin else "")


def _manifest_fields(recipe, recipe_record, variant, source, artifact, records, max_seq_len,
                     names, config) -> dict:
    if recipe.task == "embedding":
        out_dim = int(getattr(config, "hidden_size", 0) or getattr(config, "dim", 0))
    else:
        out_dim = len(source.labels or [])
    model_file = "model.onnx" if artifact.kind == "onnx" else "model.pt"
    providers = ["CUDAExecutionProvider"] if variant.provider == "cuda" else ["CPUExecutionProvider"]
    if artifact.kind == "torchscript":
        providers = ["cuda"] if variant.provider == "cuda" else ["cpu"]
    return {
        "name": variant.name,
        "family": recipe.family,
        "task": recipe.task,
        "format": artifact.kind,
        "precision": artifact.precision,
        "providers": providers,
        "model_file": model_file,
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names],
        "outputs": [{"name": artifact.output_name, "dtype": "float32", "shape": ["batch", out_dim]}],
        "max_seq_len": max_seq_len,
        "embedding_dim": out_dim if recipe.task == "embedding" else None,
        "pooling": source.pooling,
        "normalize": source.normalize,
        "labels": source.labels,
        "long_input": recipe.long_input,
        "window_overlap": recipe.window_overlap,
        "prompts": source.prompts,
        "default_prompt_name": source.default_prompt_name,
        "lineage": {
            "source": {**source.description, "model_type": source.model_type},
            "recipe": recipe_record,
            "steps": [r.model_dump() for r in records],
            "builder": _builder_versions(),
        },
        "fused_nodes": artifact.fused_nodes,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _evaluate_variant(evaluator, recipe, variant, artifact, fields, outcome, log: Log):
    """Quality and gates into ``fields`` and ``outcome``; returns the variant's runner for the latency
    probe, or None when the variant cannot run here."""
    from build_models.evaluate import (VariantUnavailable, check_gates, onnx_runner, torch_runner,
                                       torchscript_runner)

    names = artifact.input_names or evaluator.names
    try:
        if artifact.kind == "onnx":
            run = onnx_runner(artifact.path, names, evaluator.threads, variant.provider)
        elif artifact.kind == "torchscript":
            run = torchscript_runner(artifact.path, names)
        else:
            run = torch_runner(artifact.module, names)
    except VariantUnavailable as exc:
        # Honest record rather than a guess: the numbers stay empty and say why.
        note = f"not measured on this machine: {exc}"
        fields["quality"] = {"dataset": evaluator.dataset, "metric": evaluator.ref_quality.metric, "value": None,
                             "reference_value": evaluator.ref_quality.value, "retention": None, "note": note}
        log(f"[{variant.name}] {note}")
        if variant.provider != "cuda":
            outcome.gate_failures.append(f"quality could not be measured ({exc})")
        return None
    t = time.perf_counter()
    quality = evaluator.evaluate(run, variant.name)
    gates = check_gates(recipe.task, quality, recipe.gates_for(variant))
    fields["quality"] = {
        "dataset": evaluator.dataset, "metric": quality.metric, "value": quality.value,
        "reference_value": quality.reference_value, "retention": quality.retention, "extra": quality.extra,
        "gates": [{"metric": m, "value": v, "limit": lim, "passed": ok} for m, v, lim, ok in gates],
        "measured_on": getattr(run, "provider", "cpu (PyTorch)"),
        "embedding_types": quality.embedding_types,
        "held_out": quality.held_out,
    }
    if quality.ranges is not None:
        fields["embedding_ranges"] = quality.ranges
    for metric, value, limit, ok in gates:
        if not ok:
            shown = "not measured" if value is None else f"{value:.4f}"
            outcome.gate_failures.append(f"gate {metric}: {shown} < {limit}")
    summary = ", ".join(f"{k}={v:.4f}" for k, v in quality.extra.items() if isinstance(v, float))
    if quality.held_out is not None:
        h = quality.held_out
        summary += (f"; held-out {h['dataset']}: retention={h['retention']:.4f} "
                    f"knn_retention={h['knn_retention']:.4f} mean_cosine={h['mean_cosine']:.4f}")
    retention = "n/a" if quality.retention is None else f"{quality.retention:.4f}"
    log(f"[{variant.name}] retention={retention} {summary} ({time.perf_counter() - t:.0f}s)"
        + (f"  FAILED: {'; '.join(outcome.gate_failures)}" if outcome.gate_failures else ""))
    if quality.embedding_types is not None:
        from build_models.lowbit import format_table

        log(f"[{variant.name}] embedding types vs fp32 float (ubinary = binary; rescored: the type's own top "
            f"{quality.embedding_types['rescore_candidates']}, reordered by float):")
        for line in format_table(quality.embedding_types):
            log(f"[{variant.name}] {line}")
    return run


def _time_variants(evaluator, timed: dict[str, tuple], log: Log, baseline: str | None = None) -> None:
    """The latency probe of every evaluated variant, in one session against the same references.
    ``baseline``: a variant of the recipe (what a user would otherwise deploy, e.g. the fused fp32
    graph) that every other variant is also compared with, when it was built in the same run."""
    t = time.perf_counter()
    cases = evaluator.latency({name: run for name, (run, _) in timed.items()})
    for name, (_, fields) in timed.items():
        fields["latency"] = {"threads": evaluator.threads, "cases": cases[name]}
        if baseline in cases and name != baseline:
            fields["latency"]["baseline"] = baseline
            for case, row in cases[name].items():
                row["speedup_vs_baseline"] = round(cases[baseline][case]["variant"] / row["variant"], 3)
        b32 = cases[name]["batch32_seq128"]
        log(f"[{name}] speedup(b32x128)={b32['speedup']}x vs eager"
            + (f", {b32['speedup_vs_sdpa']}x vs sdpa" if "speedup_vs_sdpa" in b32 else "")
            + (f", {b32['speedup_vs_baseline']}x vs {baseline}" if "speedup_vs_baseline" in b32 else ""))
    log(f"latency probe of {len(timed)} variant(s) in {time.perf_counter() - t:.0f}s")


def _stage_files(staging: Path, artifact: Artifact, tokenizer) -> None:
    target = staging / ("model.onnx" if artifact.kind == "onnx" else "model.pt")
    shutil.copyfile(artifact.path, target)
    tokenizer.save_pretrained(str(staging / "tokenizer"))
