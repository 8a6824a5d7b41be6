"""OpenAI-compatible embeddings: POST /v1/embeddings, GET /v1/models."""

from __future__ import annotations

from typing import Literal, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service import routes
from service.api.common import call, model_entry, state
from service.api.errors import ERROR_RESPONSES
from service.api.responses import FastJSONResponse
from service.embedding_types import EmbeddingType
from service.errors import InvalidInput
from service.inputs import InferOptions, Inputs
from service.long_input import Policy
from service.outputs import check_dimensions, check_embedding_type, encode_base64, quantize_rows, truncate_dimensions

router = APIRouter(tags=["OpenAI"], responses=ERROR_RESPONSES)

# StrictInt: JSON true/false are not token ids (Python's bool is an int, pydantic's lax mode would take them).
EmbeddingInput = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # openai clients send extra fields (user, ...)

    input: EmbeddingInput = Field(description="a text, a list of texts, a list of token ids, or a list of lists of token ids")
    model: str | None = Field(None, description="model name; the server's default model when omitted")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a JSON list of numbers; base64: the vector's raw bytes, little-endian float32 "
                             "for `embedding_type` float, one byte per value (or per 8 bits) otherwise")
    # StrictInt: lax int would take JSON true as 1 dimension. Its upper bound is the model's (check_dimensions).
    dimensions: StrictInt | None = Field(
        None, ge=1, description="keep the first N dimensions; renormalized for `embedding_type` float, taken as "
                                "they are before an integer or binary encoding (see `embedding_type`)")
    embedding_type: EmbeddingType = Field(
        "float", description="bertserve extension, for vector databases that store low-bit vectors (the semantics "
                             "of sentence-transformers' quantize_embeddings): int8 / uint8, one integer per dimension "
                             "from per-dimension ranges calibrated at build time (a model built without them "
                             "answers 422); binary (int8) / ubinary (uint8), 1 bit per dimension (x > 0), packed 8 "
                             "to a byte, the last byte zero-padded when the dimensions are not a multiple of 8. With "
                             "`dimensions`, the first N values are encoded without renormalizing: int8/uint8 of N "
                             "dimensions are the first N values of the full vector's")
    long_input: Policy | None = Field(
        None, description="bertserve extension: what happens to an input longer than the model's max_seq_len: "
                          "error (422), truncate (keep the beginning), or window (embed overlapping windows and "
                          "average them, weighted by new tokens). Default: the model's, else BERTSERVE_LONG_INPUT")
    prompt_name: str | None = Field(
        None, description="bertserve extension: a sentence-transformers prompt of the model (GET /info lists them), "
                          "put before each text; its tokens count toward max_seq_len")
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str = Field(
        description="list of floats, list of ints (int8/uint8/binary/ubinary), or base64 of the raw bytes")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bertserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _inputs(value: EmbeddingInput) -> Inputs:
    """OpenAI's four input shapes: a text, texts, one token-id list, or token-id lists."""
    if isinstance(value, str):
        return Inputs.of_texts([value])
    if value and all(isinstance(v, int) for v in value):
        return Inputs.of_ids([value])
    if value and all(isinstance(v, list) for v in value):
        return Inputs.of_ids(value)
    if all(isinstance(v, str) for v in value):
        return Inputs.of_texts(value)
    raise InvalidInput("input must be a string, a list of strings, a list of token ids or a list of lists of token ids")


@router.post(routes.OPENAI_EMBEDDINGS, response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    entry = model_entry(request, body.model)
    entry.check_task("embedding")
    check_embedding_type(entry.manifest, body.embedding_type)  # before any inference is spent
    check_dimensions(entry.manifest, body.dimensions)
    options = InferOptions(long_input=body.long_input, prompt_name=body.prompt_name)
    result = await entry.embed(_inputs(body.input), options, call(request))
    rows = result.rows
    if body.embedding_type == "float":
        rows = truncate_dimensions(rows, body.dimensions, renormalize=True)
    else:
        # The calibration ranges describe the model's own values: a renormalized prefix would fall outside them.
        rows = quantize_rows(truncate_dimensions(rows, body.dimensions, renormalize=False), body.embedding_type,
                             entry.manifest)
    tokens = result.tokens
    as_b64 = body.encoding_format == "base64"
    data = [{"object": "embedding", "index": i, "embedding": encode_base64(r) if as_b64 else r}
            for i, r in enumerate(rows)]
    # Rendered straight by orjson (numpy rows included): validating thousands of floats through the
    # response model would cost more than the model itself on short texts. The schema stays documented.
    return FastJSONResponse({"object": "list", "data": data, "model": entry.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> dict:
    registry = state(request).registry
    started = int(state(request).started_at)
    ready = sorted({e.name for e in registry.entries.values() if e.ready})
    return {"object": "list", "data": [{"id": n, "object": "model", "created": started, "owned_by": "bertserve"}
                                       for n in ready]}
