"""Quantization: dynamic int8 (ONNX Runtime or PyTorch), weight-only int4 (MatMulNBits), fp16 for CUDA."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import onnx

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.recipe import QuantizeConfig


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (without them U8S8 can saturate: reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _match_nodes(model: onnx.ModelProto, patterns: list[str]) -> list[str]:
    names = [n.name for n in model.graph.node]
    matched: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise BuildError(f"quantize: nodes_to_exclude entry {pattern!r} matches no node in the graph")
        matched.extend(h for h in hits if h not in matched)
    return matched


def run(cfg: QuantizeConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.precision != "fp32":
        raise BuildError(f"quantize needs an fp32 model, this one is already {art.precision}")
    if art.kind == "torch":
        return _torch_dynamic(cfg, art)
    if art.kind != "onnx":
        raise BuildError(f"quantize works on a PyTorch model or an ONNX graph, not {art.kind}")
    if cfg.method == "int8_dynamic":
        return _onnx_int8(cfg, art, ctx)
    if cfg.method == "int4_weight_only":
        return _onnx_int4(cfg, art, ctx)
    return _onnx_fp16(cfg, art, ctx)


def _torch_dynamic(cfg: QuantizeConfig, art: Artifact) -> tuple[Artifact, dict]:
    if cfg.method != "int8_dynamic":
        raise BuildError(f"quantize method {cfg.method!r} needs an ONNX graph; PyTorch models take int8_dynamic")
    import torch
    from torch import nn

    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    # PyTorch's own route, kept beside ORT's so the two int8 paths are measured side by side.
    # Per-channel weights by default: per-tensor int8 loses visible quality on MiniLM.
    qconfig = per_channel_dynamic_qconfig if cfg.per_channel else default_dynamic_qconfig
    linears = [name for name, mod in art.module.named_modules() if isinstance(mod, nn.Linear)]
    # For PyTorch modules nodes_to_exclude names modules (fnmatch patterns, e.g. "*.layer.?.output.dense").
    excluded = set()
    for pattern in cfg.nodes_to_exclude:
        hits = {n for n in linears if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise BuildError(f"quantize: nodes_to_exclude entry {pattern!r} matches no Linear module")
        excluded |= hits
    spec = {name: qconfig for name in linears if name not in excluded}
    quantized = torch.ao.quantization.quantize_dynamic(art.module, spec, dtype=torch.qint8)
    new = Artifact(kind="torch", precision="int8", module=quantized)
    return new, {"engine": torch.backends.quantized.engine, "dtype": "qint8", "per_channel": cfg.per_channel,
                 "linear_modules": len(linears), "modules_excluded": sorted(excluded)}


def _onnx_int8(cfg: QuantizeConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(art.path))
    excluded = _match_nodes(model, cfg.nodes_to_exclude)
    reduce_range = (not cpu_has_vnni()) if cfg.reduce_range is None else cfg.reduce_range
    path = ctx.work_dir / "model.int8.onnx"
    quantize_dynamic(
        str(art.path), str(path),
        per_channel=cfg.per_channel,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        op_types_to_quantize=cfg.op_types,
        # Fused contrib ops (Attention, SkipLayerNormalization) have no ONNX type inference; without a
        # default tensor type the quantizer cannot type their outputs.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    quantized = onnx.load(str(path))
    ops = sorted({n.op_type for n in quantized.graph.node if n.op_type.startswith(("Q", "Dynamic", "MatMulInteger"))})
    new = Artifact(kind="onnx", precision="int8", path=path, input_names=art.input_names,
                   output_name=art.output_name, fused_nodes=art.fused_nodes)
    return new, {"weight_type": "QInt8", "per_channel": cfg.per_channel, "reduce_range": reduce_range,
                 "cpu_vnni": cpu_has_vnni(), "nodes_excluded": excluded, "quantized_op_types": ops}


def _onnx_int4(cfg: QuantizeConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(art.path))
    excluded = _match_nodes(model, cfg.nodes_to_exclude)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                     nodes_to_exclude=excluded)
    quantizer.process()
    path = ctx.work_dir / "model.int4.onnx"
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    count = sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits")
    if count == 0:
        raise BuildError("quantize int4_weight_only: no MatMul was converted to MatMulNBits")
    new = Artifact(kind="onnx", precision="int4", path=path, input_names=art.input_names,
                   output_name=art.output_name, fused_nodes={**art.fused_nodes, "MatMulNBits": count})
    return new, {"bits": 4, "block_size": cfg.block_size, "symmetric": cfg.symmetric,
                 "matmul_nbits_nodes": count, "nodes_excluded": excluded}


def _onnx_fp16(cfg: QuantizeConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(art.path)))
    model.convert_float_to_float16(keep_io_types=cfg.keep_io_types,
                                   node_block_list=_match_nodes(model.model, cfg.nodes_to_exclude))
    path = ctx.work_dir / "model.fp16.onnx"
    model.save_model_to_file(str(path))
    new = Artifact(kind="onnx", precision="fp16", path=path, input_names=art.input_names,
                   output_name=art.output_name, fused_nodes=art.fused_nodes)
    return new, {"keep_io_types": cfg.keep_io_types, "nodes_excluded": cfg.nodes_to_exclude}
