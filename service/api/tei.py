"""text-embeddings-inference-compatible routes: /embed, /predict, /tokenize, /decode, /info, /health."""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
from fastapi import APIRouter, Request, Response
from service.api.responses import FastJSONResponse
from pydantic import BaseModel, Field
from pydantic import WithJsonSchema
from typing import Annotated

from service import routes
from service.api.common import call, model_entry, state
from service.api.errors import ERROR_RESPONSES
from service.embedding_types import EmbeddingType
from service.errors import InvalidInput, ModelNotFound, NotReady
from service.inputs import InferOptions, Inputs
from service.long_input import Policy
from service.strict import StrictModel
from service.outputs import check_embedding_type, l2_normalize, quantize_rows, softmax, supported_embedding_types

router = APIRouter(tags=["text-embeddings-inference"], responses=ERROR_RESPONSES)


class _TeiRequest(StrictModel):
    model: str | None = Field(None, description="model name (our extension); the default model when omitted")


_TRUNCATE_DOC = ("cut inputs longer than the model's max_seq_len (true) or refuse them with 422 (false); when "
                 "omitted, the model's long-input policy applies (BERTSERVE_LONG_INPUT), as TEI's --auto-truncate")
_LONG_INPUT_DOC = ("bertserve extension: error, truncate, or window (embed overlapping windows of max_seq_len tokens "
                   "and average them, weighted by new tokens); wins over `truncate`")


class _LongInputs(_TeiRequest):
    truncate: bool | None = Field(None, description=_TRUNCATE_DOC)
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    long_input: Policy | None = Field(None, description=_LONG_INPUT_DOC)


class EmbedRequest(_LongInputs):
    inputs: Union[str, list[str]]
    normalize: bool = True
    prompt_name: str | None = Field(None, description="a sentence-transformers prompt of the model (GET /info lists "
                                                      "them), put before each input; its tokens count toward "
                                                      "max_seq_len")
    embedding_type: EmbeddingType = Field(
        "float", description="bertserve extension (not in TEI): int8 / uint8 (per-dimension ranges calibrated at "
                             "build time; 422 for a model built without them), binary (int8) / ubinary (uint8), 1 "
                             "bit per dimension packed 8 to a byte; sentence-transformers' quantize_embeddings "
                             "semantics. Integer and binary types encode the model's own output: `normalize` "
                             "does not apply to them (binary keeps only signs, which normalizing cannot change)")


class PredictRequest(_LongInputs):
    inputs: Union[str, list[str], list[list[str]]]
    raw_scores: bool = False


class TokenizeRequest(_TeiRequest):
    inputs: Union[str, list[str]]
    add_special_tokens: bool = True
    format: Literal["tokens", "compact"] = Field(
        "tokens", description="bertserve extension: `tokens` (TEI's answer, an object per token) or `compact`, "
                              "per input {ids, tokens, offsets, special} as parallel lists (offsets [start, stop] "
                              "in characters; special tokens have [0, 0]): smaller, and far cheaper for long texts")


class Score(BaseModel):
    label: str
    score: float


class Token(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class CompactTokens(BaseModel):
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[int] = Field(description="1 for a special token, else 0")


def _texts(inputs) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)


def _options(body: EmbedRequest | PredictRequest) -> InferOptions:
    return InferOptions(long_input=body.long_input, truncate=body.truncate,
                        direction=body.truncation_direction.lower(), prompt_name=getattr(body, "prompt_name", None))


@router.post(routes.TEI_EMBED, response_model=Union[list[list[float]], list[list[int]]])
async def embed(body: EmbedRequest, request: Request):
    entry = model_entry(request, body.model)
    entry.check_task("embedding")
    check_embedding_type(entry.manifest, body.embedding_type)
    rows = (await entry.embed(Inputs.of_texts(_texts(body.inputs), "inputs"), _options(body), call(request))).rows
    if body.embedding_type != "float":
        return FastJSONResponse(quantize_rows(rows, body.embedding_type, entry.manifest))
    # Models whose graph normalizes (sentence-transformers Normalize) return unit vectors either way.
    if body.normalize and not entry.manifest.normalize:
        rows = l2_normalize(rows)
    return FastJSONResponse(rows)


@router.post(routes.TEI_PREDICT, response_model=Union[list[Score], list[list[Score]]])
async def predict(body: PredictRequest, request: Request):
    entry = model_entry(request, body.model)
    entry.check_task("classification")
    single = isinstance(body.inputs, str)
    if not single and body.inputs and isinstance(body.inputs[0], list):
        raise InvalidInput("sentence pairs are not supported by this server's classifiers; send single texts")
    logits = (await entry.classify(Inputs.of_texts(_texts(body.inputs), "inputs"), _options(body),
                                   call(request))).rows
    scores = logits if body.raw_scores else softmax(logits)
    labels = entry.manifest.labels or [str(i) for i in range(scores.shape[1])]
    result = []
    for row in scores:
        order = np.argsort(-row)
        result.append([{"label": labels[i], "score": float(row[i])} for i in order])
    return FastJSONResponse(result[0] if single else result)


@router.post(routes.TEI_TOKENIZE, response_model=Union[list[list[Token]], list[CompactTokens]])
async def tokenize(body: TokenizeRequest, request: Request):
    entry = model_entry(request, body.model)
    answer = await entry.tokenize(_texts(body.inputs), body.add_special_tokens, body.format == "compact",
                                  call(request, timed=False))
    return Response(answer, media_type="application/json")


# ------------------------------------------------------------ /decode

_ID_LIST = {"type": "array", "items": {"type": "integer", "minimum": 0}}
# Taken as any JSON list and checked by the tokenizer (service/tokenization.py:check_token_ids), so that a
# bad id (a boolean, a float, a negative or out-of-vocabulary number) is refused with its position named;
# the schema documents what is accepted.
TokenIds = Annotated[list, WithJsonSchema({"anyOf": [_ID_LIST, {"type": "array", "items": _ID_LIST}]})]


class DecodeRequest(_TeiRequest):
    ids: TokenIds = Field(description="one list of token ids, or a list of lists of token ids; each id in the "
                                      "model's vocabulary")
    skip_special_tokens: bool = True


@router.post(routes.TEI_DECODE, response_model=list[str])
async def decode(body: DecodeRequest, request: Request):
    """Token ids back to text: one string per id sequence (one for a bare list of ids), as TEI answers."""
    entry = model_entry(request, body.model)
    single = not body.ids or not isinstance(body.ids[0], list)
    texts = await entry.decode([body.ids] if single else body.ids, body.skip_special_tokens,
                               call(request, timed=False), "ids", single)
    return FastJSONResponse(texts)


@router.get("/info")
async def info(request: Request, model: str | None = None) -> dict:
    entry = model_entry(request, model)
    s = state(request).settings
    m = entry.manifest
    rule = entry.long_input(InferOptions())  # what a request that names no policy gets
    model_type = ({"embedding": {"pooling": m.pooling}} if m.task == "embedding"
                  else {"classifier": {"id2label": {str(i): l for i, l in enumerate(m.labels or [])}}})
    return {
        "model_id": m.name, "model_version": m.version, "model_sha": m.files[m.model_file].sha256,
        "model_dtype": m.precision, "model_format": m.format, "model_type": model_type,
        "max_input_length": m.max_seq_len, "max_batch_tokens": s.max_batch_tokens,
        "max_client_batch_size": s.max_inputs_per_request, "max_batch_requests": s.max_batch_size,
        "max_concurrent_requests": s.max_queue_items, "tokenization_workers": s.tokenizer_threads,
        "version": state(request).version, "embedding_dim": m.embedding_dim, "normalize": m.normalize,
        "embedding_types": supported_embedding_types(m),  # our extension: what /embed's embedding_type takes
        # Our extensions: the sentence-transformers prompts prompt_name takes, and how long inputs are treated.
        "prompts": m.prompts, "default_prompt_name": m.default_prompt_name,
        "long_input": rule.policy, "window_overlap": rule.overlap, "max_windows_per_input": rule.max_windows,
    }


@router.get(routes.TEI_HEALTH)
async def health(request: Request) -> dict:
    registry = state(request).registry
    try:
        entry = registry.get(None)
    except ModelNotFound:
        # Why (a missing store, a failed load) is in the log: it names paths, which clients don't need.
        raise NotReady("the default model is not loaded") from None
    registry.check_ready(entry)
    return {"status": "ok", "model": entry.name, "version": entry.version}
