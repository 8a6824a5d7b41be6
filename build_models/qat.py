"""Ternary and binary weights for a BERT encoder's linear layers, learnt by quantization-aware training.

Rounding a trained BERT's weights to 1-2 bits after training destroys it; the published recipes
(TernaryBERT, Zhang et al. 2020; BinaryBERT, Bai et al. 2021; BitNet b1.58, Ma et al. 2024) keep a
latent fp32 weight, use its quantized form in every forward pass, and let the gradient of the
quantized weight reach the latent one by the straight-through estimator (STE), while a teacher's
outputs (distillation) steer the student back to what the fp32 model computed. This module holds the
PyTorch side only; the build step is build_models/steps/qat.py and the 2-bit ONNX export is
quantize's ``int2_weight_only`` (build_models/steps/quantize.py).

- ``LowBitLinear`` wraps an ``nn.Linear``'s weight and bias (the same Parameters) and computes with
  ``ternary`` weights {-1, 0, +1}·α (TWN / TernaryBERT: threshold Δ = 0.7·mean|W|, α = mean |W| over
  |W| > Δ) or ``binary`` weights ±α (α = mean|W|), one α per output channel (``channel``) or per block
  of ``block_size`` input columns of each output channel (``block``). The bias stays fp32.
- ``quantize_linears`` puts LowBitLinear in place of the encoder's attention (query, key, value,
  output) and FFN (intermediate, output) projections, never the embeddings, the pooler or a head;
  fnmatch patterns of module names keep some in fp32 (say the first layer, ``"*.layer.0.*"``).
- ``freeze`` turns every LowBitLinear back into a plain ``nn.Linear`` holding exactly α·code, so the
  ordinary ONNX export works unchanged and int2_weight_only finds the weights on its 2-bit grid.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Iterable

import torch
from torch import nn

WEIGHTS = ("ternary", "binary")
GRANULARITIES = ("channel", "block")
# The projections of a BERT-layout layer (BERT, RoBERTa: ``...encoder.layer.N.<name>``): what is
# quantized. Embeddings, the pooler and a classification head never match.
PROJECTION = re.compile(r"(^|\.)layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                        r"|intermediate\.dense|output\.dense)$")
# TWN's threshold factor: Δ = 0.7·mean|W| approximately minimises ||W - α·T||² for Gaussian-like W.
TERNARY_THRESHOLD = 0.7


def lowbit_weight(weight: torch.Tensor, weights: str, granularity: str = "channel",
                  block_size: int = 32) -> torch.Tensor:
    """The quantized form of ``weight`` [out, in]: α·code, code in {-1, 0, 1} (ternary) or {-1, 1}
    (binary), α per output channel or per block of ``block_size`` input columns. Each value is
    exactly α·code in float32 (a product with ±1 or 0 rounds nothing)."""
    out_features, in_features = weight.shape
    group = in_features if granularity == "channel" else block_size
    groups = weight.reshape(out_features, in_features // group, group)
    magnitude = groups.abs()
    if weights == "ternary":
        delta = TERNARY_THRESHOLD * magnitude.mean(dim=-1, keepdim=True)
        kept = magnitude > delta
        # α: the mean magnitude of the weights above the threshold (0 for an all-zero group).
        alpha = (magnitude * kept).sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp(min=1)
        code = torch.sign(groups) * kept
    else:
        alpha = magnitude.mean(dim=-1, keepdim=True)
        code = torch.where(groups >= 0, 1.0, -1.0).to(groups.dtype)  # sign(0) would be 0: binary has no 0
    return (code * alpha).reshape(out_features, in_features)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the identity (the plain STE of TernaryBERT and
    BitNet b1.58), so the gradient of the quantized weight is the latent weight's gradient. Not clipped
    at |W| > 1 as BinaryNet's STE is: BERT's weights are ~0.05, so that bound would never act, and a
    bound relative to α would freeze the large weights that carry the most signal. α is a function of
    W but gets no gradient of its own (it is recomputed from the latent weights at every step)."""

    @staticmethod
    def forward(ctx, latent, weights, granularity, block_size):
        return lowbit_weight(latent, weights, granularity, block_size)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def bits_per_weight(weights: str, granularity: str, block_size: int, in_features: int) -> float:
    """Information per weight: the code (log2 3 for ternary, 1 for binary) plus one fp32 α spread over
    its group. The 2-bit export stores 2 bits per code (ternary's codes take 3 of the 4 values)."""
    group = in_features if granularity == "channel" else block_size
    return (math.log2(3) if weights == "ternary" else 1.0) + 32 / group


class LowBitLinear(nn.Module):
    """An ``nn.Linear`` computing with its ternary or binary weight; the latent fp32 weight (the same
    Parameter the wrapped Linear had) is what the optimizer updates."""

    def __init__(self, linear: nn.Linear, weights: str, granularity: str = "channel", block_size: int = 32):
        super().__init__()
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "block" and (block_size < 1 or linear.in_features % block_size):
            raise ValueError(f"block_size {block_size} does not divide the {linear.in_features} input columns")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weights, self.granularity, self.block_size = weights, granularity, block_size
        # The same Parameters (and so the same state_dict names, ``weight`` and ``bias``) as the Linear.
        self.weight = linear.weight
        self.bias = linear.bias

    def quantized_weight(self) -> torch.Tensor:
        return _StraightThrough.apply(self.weight, self.weights, self.granularity, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.weights, self.granularity, self.block_size, self.in_features)

    def to_linear(self) -> nn.Linear:
        """A plain Linear whose weight is exactly the quantized weight, and the same fp32 bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(lowbit_weight(self.weight.detach(), self.weights, self.granularity,
                                              self.block_size))
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        linear.requires_grad_(self.weight.requires_grad)
        return linear

    def extra_repr(self) -> str:
        grouping = "per channel" if self.granularity == "channel" else f"per block of {self.block_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights} "
                f"({grouping}), bias={self.bias is not None}")


def projection_names(model: nn.Module) -> list[str]:
    """The Linear modules of the encoder's layers that a low-bit student quantizes, in module order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, LowBitLinear)) and PROJECTION.search(name)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def quantize_linears(model: nn.Module, weights: str, granularity: str = "channel", block_size: int = 32,
                     keep_fp32: Iterable[str] = ()) -> list[str]:
    """Put LowBitLinear in place of the encoder's projections (in place), except those whose module
    name matches a ``keep_fp32`` fnmatch pattern; returns the names of the replaced modules.

    A pattern that matches no projection is an error (a typo would silently quantize a layer meant
    to stay fp32)."""
    keep_fp32 = list(keep_fp32)
    names = [n for n in projection_names(model) if isinstance(model.get_submodule(n), nn.Linear)]
    if not names:
        raise ValueError("no attention or FFN projection (encoder.layer.N...) found to quantize")
    for pattern in keep_fp32:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"keep_fp32 pattern {pattern!r} matches no projection; they are named like "
                             f"{names[0]!r}")
    replaced = []
    for name in names:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep_fp32):
            continue
        _set_module(model, name, LowBitLinear(model.get_submodule(name), weights, granularity, block_size))
        replaced.append(name)
    return replaced


def freeze(model: nn.Module) -> nn.Module:
    """Every LowBitLinear in ``model`` turned (in place) into an ``nn.Linear`` holding exactly its
    quantized weight; returns the model (or the Linear, when ``model`` is itself a LowBitLinear)."""
    if isinstance(model, LowBitLinear):
        return model.to_linear()
    for name, module in list(model.named_modules()):
        if isinstance(module, LowBitLinear):
            _set_module(model, name, module.to_linear())
    return model
