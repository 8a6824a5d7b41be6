"""Trace the PyTorch model to a TorchScript archive that loads with ``torch.jit.load`` alone."""

from __future__ import annotations

import numpy as np
import torch

from build_models.artifact import Artifact, BuildContext
from build_models.errors import BuildError
from build_models.recipe import ExportTorchScriptConfig
from build_models.steps._inputs import check_batches, example_batch, input_order, ordered
from build_models.steps.export_onnx import output_name


def run(cfg: ExportTorchScriptConfig, art: Artifact, ctx: BuildContext) -> tuple[Artifact, dict]:
    if art.kind != "torch":
        raise BuildError(f"export_torchscript needs a PyTorch model, the previous step produced {art.kind}")
    names = input_order(ctx)
    # Trace with padding present so the mask path is recorded as tensor ops, not skipped.
    sample = example_batch(ctx, [ctx.sample_texts[0], ctx.sample_texts[1][:30]], 48)
    path = ctx.work_dir / "model.pt"
    with torch.no_grad():
        traced = torch.jit.trace(art.module, ordered(sample, names), check_trace=False, strict=False)
        # Not frozen: torch.jit.freeze made MiniLM slower at batch 32 x 128 (docs/measurements.md).
    torch.jit.save(traced, str(path))
    reloaded = torch.jit.load(str(path), map_location="cpu")
    worst = 0.0
    tolerance = cfg.atol if art.precision == "fp32" else 1e-6 + cfg.atol
    for batch in check_batches(ctx):
        args = ordered(batch, names)
        with torch.no_grad():
            expected = art.module(*args).numpy()
            got = reloaded(*args).numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise BuildError(
            f"export_torchscript: traced module differs from PyTorch by {worst:.2e} on untraced shapes"
        )
    new = Artifact(kind="torchscript", precision=art.precision, path=path, input_names=names,
                   output_name=output_name(ctx.task))
    return new, {"max_abs_diff_vs_torch_untraced_shapes": worst, "inputs": names}
