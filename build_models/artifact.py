"""What flows between build steps: the model as it stands after each step, plus what it has learned."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from build_models.sources import ResolvedSource
from build_models.training.distributed import World

Kind = Literal["torch", "onnx", "torchscript"]


@dataclass
class BuildContext:
    """Read-only facts a step may use: the source, the tokenizer, a scratch folder, the provider."""

    source: ResolvedSource
    task: str
    tokenizer: Any
    work_dir: Path
    max_seq_len: int
    provider: str  # "cpu" | "cuda"
    sample_texts: list[str]  # real text for export checks; never the evaluation split
    # The PyTorch model as exported (after any pruning or distillation), for checking later steps.
    torch_model: nn.Module | None = None
    model_config: Any = None
    # Where training steps keep resumable checkpoints (the store's .checkpoints/); None = no checkpoints.
    checkpoint_dir: Path | None = None
    # The recipe's fp32 reference (the source, or its fine-tuned teacher): what distill mimics.
    reference: nn.Module | None = None
    # The processes this build runs in (one, or torchrun's ranks); training steps use it.
    world: World = field(default_factory=World)
    # Every text the evaluation scores or fits a probe on, normalized (corpora.normalized): training
    # steps leave them out.
    evaluation_texts: frozenset[str] = frozenset()


@dataclass
class Artifact:
    kind: Kind
    precision: str = "fp32"
    module: nn.Module | None = None  # kind == "torch"
    path: Path | None = None  # kind in ("onnx", "torchscript")
    input_names: list[str] = field(default_factory=list)
    output_name: str = ""
    fused_nodes: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
