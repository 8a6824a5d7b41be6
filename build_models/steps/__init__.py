"""Build steps, one module each. A step is ``run(config, artifact, ctx) -> (artifact, details)``.

prune, distill and qat take and return ``kind == "torch"`` artifacts, so they slot in before the export
step; finetune runs in a recipe's ``teacher:`` section and makes the reference itself.
"""

from __future__ import annotations

from typing import Any, Callable

from build_models.artifact import Artifact, BuildContext
from build_models.steps import (distill, export_onnx, export_torchscript, finetune, optimize, prune, qat,
                                quantize)

StepFn = Callable[[Any, Artifact, BuildContext], tuple[Artifact, dict]]

STEPS: dict[str, StepFn] = {
    "prune": prune.run,
    "distill": distill.run,
    "qat": qat.run,
    "finetune": finetune.run,
    "export_onnx": export_onnx.run,
    "export_torchscript": export_torchscript.run,
    "optimize": optimize.run,
    "quantize": quantize.run,
}
