"""ONNX Runtime's transformer optimizer, with proof that the fusions happened.

``attention: fused`` (the default) lets the optimizer merge the query, key and value projections into
one ``Attention`` node with a packed [hidden, 3·hidden] weight. ``attention: multi_head`` asks it for
``MultiHeadAttention`` instead (FusionOptions.use_multi_head_attention): the three projections stay
separate MatMuls feeding the attention node (their biases go into it), while SkipLayerNormalization,
BiasGelu and EmbedLayerNormalization fuse as before. A 2-bit export needs that, since a packed QKV
weight is no MatMul that int2_weight_only could turn into MatMulNBits. The CPU provider runs
MultiHeadAttention with the same 1-D mask index (right padding) as Attention; the build checks the
result against PyTorch either way.
"""

from __future__ import annotations

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.recipe import OptimizeConfig
from build_models.sources import ORT_MODEL_TYPE
from build_models.steps.export_onnx import check_against_torch

FUSED_OPS = (
    "EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
    "BiasGelu", "FastGelu", "Gelu", "GemmFastGelu", "LayerNormalization",
)


def head_geometry(config) -> tuple[int, int]:
    """Heads and hidden size as the optimizer must see them (after any head pruning)."""
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0))
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "dim", 0))
    pruned = getattr(config, "pruned_heads", None) or {}
    if pruned:
        counts = {heads - len(v) for v in pruned.values()}
        if len(counts) != 1 or len(pruned) != int(config.num_hidden_layers):
            return 0, 0  # uneven: let the optimizer read each layer's shape from the graph
        left = counts.pop()
        hidden = hidden // heads * left
        heads = left
    return heads, hidden


def count_fused(model_proto) -> dict[str, int]:
    counts = {op: 0 for op in FUSED_OPS}
    for node in model_proto.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return {k: v for k, v in counts.items() if v}


def run(cfg: OptimizeConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "onnx":
        raise BuildError(f"optimize needs an ONNX graph, the previous step produced {art.kind}")
    if art.precision != "fp32":
        raise BuildError("optimize needs an fp32 graph: put it before quantize")
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    config = ctx.model_config if ctx.model_config is not None else AutoConfig.from_pretrained(ctx.source.path)
    heads, hidden = head_geometry(config)
    model_type = ORT_MODEL_TYPE.get(ctx.source.model_type, "bert")
    options = None
    if cfg.attention == "multi_head":
        from onnxruntime.transformers.fusion_options import FusionOptions

        options = FusionOptions(model_type)
        options.use_multi_head_attention = True
    optimized = optimize_model(
        str(art.path), model_type=model_type, num_heads=heads, hidden_size=hidden,
        optimization_options=options, opt_level=cfg.opt_level, use_gpu=cfg.use_gpu, only_onnxruntime=False,
    )
    fused = count_fused(optimized.model)
    if cfg.require_fusion:
        missing = [op for op in ("SkipLayerNormalization",) if not fused.get(op)]
        if cfg.attention == "multi_head":
            # Only MultiHeadAttention keeps the projections apart; an Attention node here would mean
            # packed Q/K/V weights, which is what this option exists to avoid.
            if not fused.get("MultiHeadAttention") or fused.get("Attention"):
                missing.insert(0, "MultiHeadAttention (projections kept)")
        elif not (fused.get("Attention") or fused.get("MultiHeadAttention")):
            missing.insert(0, "Attention")
        if missing:
            raise BuildError(
                f"optimize: expected fusions did not happen ({', '.join(missing)}); fused: {fused or 'none'}"
            )
    path = ctx.work_dir / "model.optimized.onnx"
    optimized.save_model_to_file(str(path))
    new = Artifact(kind="onnx", precision="fp32", path=path, input_names=art.input_names,
                   output_name=art.output_name, fused_nodes=fused)
    details = {"fused_nodes": fused, "num_heads": heads, "hidden_size": hidden, "model_type": model_type,
               "attention": cfg.attention}
    if ctx.torch_model is not None:
        diff = check_against_torch(path, ctx.torch_model, ctx, art.input_names)
        details["max_abs_diff_vs_torch"] = diff
        if diff > 1e-3:
            raise BuildError(f"optimize: fused graph differs from PyTorch by {diff:.2e}")
    return new, details
