"""Quantization-aware distillation: a ternary or binary student trained to mimic its fp32 teacher.

The student is a copy of the model as it stands (every layer, unless num_layers / layers pick some as
distill does) whose attention and FFN projections compute with ternary or binary weights
(build_models/qat.py: LowBitLinear, straight-through gradients to fp32 latent weights). It trains with
distill's losses (DistillTask, StudentForward: sentence embeddings or logits, plus the hidden-state
and attention losses when weighted), data, loop, checkpoints, progress bar and strategies; the
teacher is the recipe's fp32 reference, as for distill. At the end the low-bit layers are frozen into
plain nn.Linear layers holding exactly α·code, so the artifact is an ordinary fp32 PyTorch model
(precision "fp32", which export_onnx and optimize accept) whose projections lie on a 2-bit grid:
``quantize: {method: int2_weight_only}`` after the export stores them in 2 bits.
"""

from __future__ import annotations

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.modeling import encoder_layers
from build_models.qat import LowBitLinear, freeze, projection_names, quantize_linears
from build_models.recipe import QatConfig
from build_models.steps.distill import _teacher, check_layer_losses, make_student, student_layers, train_student
from build_models.training.strategy import resolve_strategy


def _check_strategy(cfg: QatConfig) -> None:
    """single and ddp only."""
    if cfg.strategy in ("pipeline", "parameter_server"):
        # Both build their own views of the model (stages of layers; flat parameter shards pushed
        # over RPC). The low-bit layers would travel as ordinary modules, but neither path has been
        # tested with them, so they are refused rather than trusted.
        raise BuildError(f"qat trains with the single or ddp strategy (or auto), not {cfg.strategy}")


def run(cfg: QatConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "torch" or art.module is None:
        raise BuildError(f"qat needs the PyTorch model: put it before export (got {art.kind})")
    if art.precision != "fp32":
        raise BuildError("qat trains in fp32: put quantize after the export")
    _check_strategy(cfg)
    world = ctx.world
    teacher = _teacher(cfg, art, ctx)
    start_from = art.module
    depth = len(encoder_layers(start_from, "qat"))
    keep = list(range(depth)) if cfg.num_layers is None and cfg.layers is None else student_layers(cfg, depth)
    strategy = resolve_strategy(cfg.strategy, world, cfg.batch_size, "qat", layers=len(keep),
                                micro_batches=cfg.micro_batches, schedule=cfg.pipeline_schedule)
    check_layer_losses("qat", cfg, depth, len(encoder_layers(teacher, "qat")))
    student = make_student(start_from, keep)
    try:
        replaced = quantize_linears(student, cfg.weights, cfg.granularity, cfg.block_size, cfg.keep_fp32)
    except ValueError as exc:
        raise BuildError(f"qat: {exc}") from None
    if not replaced:
        raise BuildError(f"qat: keep_fp32 {cfg.keep_fp32} keeps every projection; nothing would be quantized")
    kept = [n for n in projection_names(student) if n not in set(replaced)]
    trained = train_student("qat", cfg, student, start_from, teacher, keep, ctx, strategy)
    low_bit = [m for m in student.modules() if isinstance(m, LowBitLinear)]
    quantized_params = sum(m.weight.numel() for m in low_bit)
    bits = sum(m.bits_per_weight() * m.weight.numel() for m in low_bit) / quantized_params
    frozen = freeze(student)
    details = {
        "weights": cfg.weights, "granularity": cfg.granularity,
        "block_size": cfg.block_size if cfg.granularity == "block" else None,
        "replaced_modules": len(replaced), "kept_fp32_modules": kept,
        # code bits (log2 3 or 1) plus the fp32 α per group, averaged over the quantized weights
        "bits_per_weight": round(bits, 4), "quantized_weights": quantized_params,
        **trained, "params": sum(p.numel() for p in frozen.parameters()),
    }
    return Artifact(kind="torch", precision="fp32", module=frozen), details
