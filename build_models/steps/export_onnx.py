"""Export the PyTorch model to ONNX with dynamic batch and sequence axes, then check it against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.recipe import ExportOnnxConfig
from build_models.steps._inputs import check_batches, example_batch, input_order, ordered


def output_name(task: str) -> str:
    return "sentence_embedding" if task == "embedding" else "logits"


def run(cfg: ExportOnnxConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "torch":
        raise BuildError(f"export_onnx needs a PyTorch model, the previous step produced {art.kind}")
    if art.precision != "fp32":
        raise BuildError("export_onnx needs an fp32 PyTorch model; quantize after export_onnx instead")
    names = input_order(ctx)
    out_name = output_name(ctx.task)
    sample = example_batch(ctx, ctx.sample_texts[:2], 32)
    path = ctx.work_dir / "model.onnx"
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic[out_name] = {0: "batch"}
    with torch.no_grad():
        # The TorchScript-based exporter: its BERT graph is the one ORT's transformer fusions match.
        torch.onnx.export(
            art.module,
            ordered(sample, names),
            str(path),
            input_names=names,
            output_names=[out_name],
            dynamic_axes=dynamic,
            opset_version=cfg.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    max_diff = check_against_torch(path, art.module, ctx, names)
    if max_diff > cfg.atol:
        raise BuildError(f"export_onnx: ONNX output differs from PyTorch by {max_diff:.2e} > atol {cfg.atol}")
    new = Artifact(kind="onnx", precision="fp32", path=path, input_names=names, output_name=out_name)
    return new, {"opset": cfg.opset, "max_abs_diff_vs_torch": float(max_diff), "inputs": names}


def check_against_torch(path, module, ctx, names) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in check_batches(ctx):
        with torch.no_grad():
            expected = module(*ordered(batch, names)).numpy()
        got = session.run(None, {n: batch[n].numpy() for n in names})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
