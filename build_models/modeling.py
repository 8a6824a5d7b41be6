"""PyTorch modules whose single output is what the server returns: a sentence embedding or logits.

Pooling and normalization live inside the module, so they end up inside the exported ONNX graph
and TorchScript archive, and every backend returns the final vector.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


class EmbeddingModel(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids, attention_mask, token_type_ids=None, head_mask=None):
        # head_mask: only for importance scoring while pruning; exports never pass it.
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if head_mask is not None:
            kwargs["head_mask"] = head_mask
        hidden = self.encoder(**kwargs, return_dict=False)[0]
        return self.pool(hidden, attention_mask)

    def pool(self, hidden, attention_mask):
        """Token states -> the sentence embedding (pooling, then normalization when asked)."""
        return pool(hidden, attention_mask, self.pooling, self.normalize)


def pool(hidden, attention_mask, pooling: str, normalize: bool):
    """Token states -> the sentence embedding; also a pipeline's last stage, which holds no EmbeddingModel."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden + (mask - 1.0) * 1e9).max(dim=1).values
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if normalize:
        pooled = pooled / pooled.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
    return pooled


class ClassificationModel(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, token_type_ids=None, head_mask=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if head_mask is not None:
            kwargs["head_mask"] = head_mask
        return self.classifier(**kwargs, return_dict=False)[0]


def load_reference(path: Path, task: str, pooling: str | None, normalize: bool,
                   attn_implementation: str = "eager") -> nn.Module:
    """The fp32 PyTorch model every variant is measured against, in eval mode.

    Eager attention by default, not SDPA: its graph is the one ONNX Runtime's fusions recognise,
    and it traces without data-dependent branches on the mask. The latency probe also times the
    SDPA model (transformers' default) so the speedups are not flattered by a slow baseline.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    kwargs = {"attn_implementation": attn_implementation}
    if task == "embedding":
        if _is_bert(path):
            kwargs["add_pooling_layer"] = False  # sentence embeddings never use BERT's pooler
        model: nn.Module = EmbeddingModel(AutoModel.from_pretrained(path, **kwargs), pooling or "mean", normalize)
    else:
        model = ClassificationModel(AutoModelForSequenceClassification.from_pretrained(path, **kwargs))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _is_bert(path: Path) -> bool:
    import json

    return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "bert"


def inner_model(model: nn.Module) -> nn.Module:
    """The wrapped Hugging Face model (the encoder, or the whole classifier with its head)."""
    return model.encoder if isinstance(model, EmbeddingModel) else model.classifier


def encoder_config(model: nn.Module):
    """The Hugging Face config of the wrapped transformer (heads and hidden size for the optimizer)."""
    return inner_model(model).config


def encoder_layers(model: nn.Module, step: str) -> nn.ModuleList:
    """The transformer layers of a BERT-layout encoder (BERT, RoBERTa), which ``step`` edits in place."""
    from build_models.errors import BuildError

    base = getattr(inner_model(model), "base_model", inner_model(model))
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(l, "intermediate") and hasattr(l, "output")
                                                        for l in layers):
        raise BuildError(f"{step}: supports BERT-layout encoders (BERT, RoBERTa); got {type(base).__name__}")
    return layers
