"""Quantization: dynamic int8 (ONNX Runtime or PyTorch), weight-only int4 and int2 (MatMulNBits), fp16
for CUDA.

int2_weight_only does not choose weights: it stores, in 2 bits, the MatMul weights a qat step already
left on a 2-bit grid (build_models/qat.py), with exactly their scales; any other MatMul stays fp32.
What ONNX Runtime 1.32's CPU provider does with MatMulNBits bits=2 (read in its source, and measured
on this project's AVX-512 VNNI build machine, tests/unit/test_qat.py):
- accuracy_level 0 (fp32): no 2-bit kernel; MatMulNBits::ComputeBUnpacked dequantizes the whole weight
  to fp32 at every call (MlasDequantizeBlockwise<float, 2>), then runs SGEMM. Exact to fp32 rounding,
  but the per-call dequantization makes batch-1 calls slower than a plain fp32 MatMul.
- accuracy_level 4: MLAS's W2 kernel (SQ2BitGemm CompInt8, AVX-512 / AVX-512 VNNI, block_size 32, 64
  or 128): activations quantized to int8 per block of K, int8 dot products against the 2-bit codes
  with a zero-point correction. About 0.5% relative error per product; other CPUs and block sizes
  (16) fall back to the fp32 path above.
- The session option ``mlas.use_lut_gemm`` selects a table-lookup 2-bit kernel instead; the server
  does not set it.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
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
    if cfg.method == "int2_weight_only":
        return _onnx_int2(cfg, art, ctx)
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
    # accuracy_level 0 leaves the attribute out (ORT's default, 0), so such graphs stay as they were.
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                     accuracy_level=cfg.accuracy_level or None, nodes_to_exclude=excluded)
    quantizer.process()
    path = ctx.work_dir / "model.int4.onnx"
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    graph = quantizer.model.model.graph  # what was just saved
    count = sum(1 for n in graph.node if n.op_type == "MatMulNBits")
    if count == 0:
        raise BuildError("quantize int4_weight_only: no MatMul was converted to MatMulNBits")
    details = {"bits": 4, "block_size": cfg.block_size, "symmetric": cfg.symmetric,
               "accuracy_level": cfg.accuracy_level, "matmul_nbits_nodes": count, "nodes_excluded": excluded}
    path = _embeddings(cfg, path, graph, details)
    new = Artifact(kind="onnx", precision="int4", path=path, input_names=art.input_names,
                   output_name=art.output_name, fused_nodes={**art.fused_nodes, "MatMulNBits": count})
    return new, details


def _embeddings(cfg: QuantizeConfig, path: Path, graph: onnx.GraphProto, details: dict) -> Path:
    """With ``embeddings: int8``, the graph saved at ``path`` (``graph``, in memory) with its fused
    embedding tables (word, position, segment) in int8: ORT's dynamic quantizer turns
    EmbedLayerNormalization into QEmbedLayerNormalization, as int8_dynamic does. Returns the graph to
    publish."""
    details["embeddings"] = cfg.embeddings
    if cfg.embeddings == "fp32":
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not any(n.op_type == "EmbedLayerNormalization" for n in graph.node):
        raise BuildError("quantize embeddings: int8 needs the fused EmbedLayerNormalization node; put an "
                         "optimize step before quantize")
    out = path.with_name(path.stem + ".emb8.onnx")
    quantize_dynamic(str(path), str(out), op_types_to_quantize=["EmbedLayerNormalization"],
                     weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


# MatMulNBits with bits=2 and no zero_points input: value = (code - 2) · scale, codes 0..3. Ternary
# weights use codes {1, 2, 3} ({-α, 0, +α}), binary {1, 3}.
INT2_ZERO_POINT = 2


def two_bit_grid(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes [N, K/block, block] uint8, scales [N, K/block] float32) when every block of ``block_size``
    rows of K in each output column of ``weight`` [K, N] (a MatMul's B) is exactly (code - 2)·scale
    with codes 0..3; None when any block is off that grid (or K does not split into blocks).

    The scale of a block is its largest positive value (only code 3 is positive), else its smallest
    negative magnitude; an all-zero block gets scale 0. Equality is exact: the qat step's frozen
    weights are α·{-1, 0, 1} in float32, and (code - 2)·α reproduces them bit for bit."""
    if weight.ndim != 2 or weight.shape[0] % block_size:
        return None
    k, n = weight.shape
    blocks = np.ascontiguousarray(weight.astype(np.float32, copy=False).T).reshape(n, k // block_size, block_size)
    top = blocks.max(axis=-1)
    smallest_negative = np.where(blocks < 0, -blocks, np.inf).min(axis=-1)
    scales = np.where(top > 0, top, np.where(np.isfinite(smallest_negative), smallest_negative, 0)).astype(np.float32)
    safe = np.where(scales > 0, scales, 1)[..., None]
    steps = np.rint(blocks / safe)
    if steps.min() < -INT2_ZERO_POINT or steps.max() > 3 - INT2_ZERO_POINT:
        return None
    if not np.array_equal(steps.astype(np.float32) * scales[..., None], blocks):
        return None
    return (steps + INT2_ZERO_POINT).astype(np.uint8), scales


def pack_2bit(codes: np.ndarray) -> np.ndarray:
    """Codes [N, blocks, block] (0..3) as MatMulNBits' B [N, blocks, block/4]: four codes a byte, the
    first in the low bits."""
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def unpack_2bit(packed: np.ndarray) -> np.ndarray:
    """The inverse of pack_2bit: [N, blocks, block/4] bytes to [N, blocks, block] codes."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    return ((packed[..., None] >> shifts) & 3).reshape(*packed.shape[:-1], packed.shape[-1] * 4)


def int2_matmuls(model: onnx.ModelProto, block_size: int, accuracy_level: int = 0,
                 exclude: list[str] = ()) -> tuple[int, list[str]]:
    """Turn (in place) every MatMul whose B is a constant initializer on the 2-bit grid into
    MatMulNBits bits=2 with exactly those codes and scales; returns (converted, names of the MatMuls
    with a constant weight left as they were). Activation-by-activation MatMuls (attention scores)
    have no constant weight and are neither."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    converted, skipped, nodes = 0, [], []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None:
            nodes.append(node)
            continue
        array = onnx.numpy_helper.to_array(weight)
        grid = None if node.name in exclude else two_bit_grid(array, block_size)
        if grid is None:
            skipped.append(node.name)
            nodes.append(node)
            continue
        codes, scales = grid
        k, n = array.shape
        packed = onnx.numpy_helper.from_array(pack_2bit(codes), f"{weight.name}_int2")
        scale = onnx.numpy_helper.from_array(scales.reshape(-1), f"{weight.name}_int2_scales")
        graph.initializer.extend([packed, scale])
        nodes.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], packed.name, scale.name], list(node.output),
            name=f"{node.name}_int2" if node.name else "", domain="com.microsoft",
            K=k, N=n, bits=2, block_size=block_size, accuracy_level=accuracy_level))
        users[weight.name] -= 1
        if users[weight.name] == 0:
            graph.initializer.remove(weight)
        converted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if converted and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return converted, skipped


def _onnx_int2(cfg: QuantizeConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    # Our own packing, not MatMulNBitsQuantizer: it would choose new scales by rounding, where the
    # qat step's α are what the student was trained with.
    if cfg.block_size & (cfg.block_size - 1):
        raise BuildError(f"quantize int2_weight_only: MatMulNBits needs a power-of-two block_size, "
                         f"got {cfg.block_size}")
    model = onnx.load(str(art.path))
    excluded = _match_nodes(model, cfg.nodes_to_exclude)
    converted, skipped = int2_matmuls(model, cfg.block_size, cfg.accuracy_level, excluded)
    if converted == 0:
        raise BuildError(
            f"quantize int2_weight_only: no MatMul weight lies on a 2-bit grid of blocks of {cfg.block_size} "
            f"({len(skipped)} MatMuls with fp32 weights); put a qat step before the export, and give "
            f"quantize a block_size that divides the qat step's")
    packed_path = ctx.work_dir / "model.int2.onnx"
    onnx.save(model, str(packed_path))
    details = {"bits": 2, "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
               "matmul_nbits_nodes": converted, "matmuls_kept_fp32": len(skipped), "kept_fp32": skipped,
               "nodes_excluded": excluded,
               # 2 bits per code plus one fp32 scale per block.
               "stored_bits_per_weight": 2 + 32 / cfg.block_size}
    packed = sum(1 for n in model.graph.node if n.op_type == "Attention")
    if packed:
        # A fused Attention node's packed Q/K/V weight is no MatMul: it stays fp32.
        details["note"] = (f"{packed} Attention nodes keep their packed Q/K/V weights in fp32; optimize with "
                           f"attention: multi_head to store those projections in 2 bits too")
    path = _embeddings(cfg, packed_path, model.graph, details)
    if ctx.torch_model is not None:
        from build_models.steps.export_onnx import check_against_torch

        diff = check_against_torch(packed_path, ctx.torch_model, ctx, art.input_names)
        details["max_abs_diff_vs_torch"] = diff
        # fp32 activations compute the frozen student's own products: anything more than rounding is a
        # packing bug. With int8 activations (accuracy_level 4) the difference is measured, not checked.
        if cfg.accuracy_level == 0 and diff > 1e-3:
            raise BuildError(f"quantize int2_weight_only: the 2-bit graph differs from PyTorch by {diff:.2e}")
        if path != packed_path:
            # What the int8 tables add to the packing's difference, measured.
            details["max_abs_diff_vs_torch_with_int8_embeddings"] = check_against_torch(
                path, ctx.torch_model, ctx, art.input_names)
    new = Artifact(kind="onnx", precision="int2", path=path, input_names=art.input_names,
                   output_name=art.output_name, fused_nodes={**art.fused_nodes, "MatMulNBits": converted})
    return new, details


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
