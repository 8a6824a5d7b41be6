"""OpenAI-compatible embeddings: POST /v1/embeddings, GET /v1/models."""

from __future__ import annotations

from typing import Literal, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service.api.common import encode_ids, encode_texts, model_entry, run, state
from service.api.errors import ERROR_RESPONSES
from service.api.responses import FastJSONResponse
from service.errors import InvalidInput
from service.outputs import encode_base64, truncate_dimensions

router = APIRouter(tags=["OpenAI"], responses=ERROR_RESPONSES)

# StrictInt: JSON true/false are not token ids (Python's bool is an int, pydantic's lax mode would take them).
EmbeddingInput = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # openai clients send extra fields (user, ...)

    input: EmbeddingInput = Field(description="a text, a list of texts, a list of token ids, or a list of lists of token ids")
    model: str | None = Field(None, description="model name; the server's default model when omitted")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="truncate to this many dimensions and renormalize")
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


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


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    entry = model_entry(request, body.model)
    if entry.manifest.task != "embedding":
        raise InvalidInput(f"model {entry.name!r} is a {entry.manifest.task} model; use /predict")
    value = body.input
    if isinstance(value, str):
        encoded = await encode_texts(request, entry, [value], truncate=False)
    elif value and all(isinstance(v, int) for v in value):
        encoded = await encode_ids(request, entry, [value], truncate=False)
    elif value and all(isinstance(v, list) for v in value):
        encoded = await encode_ids(request, entry, value, truncate=False)
    elif all(isinstance(v, str) for v in value):
        encoded = await encode_texts(request, entry, value, truncate=False)
    else:
        raise InvalidInput("input must be a string, a list of strings, a list of token ids or a list of lists of token ids")
    rows = truncate_dimensions(await run(request, entry, encoded), body.dimensions, renormalize=True)
    tokens = sum(len(e) for e in encoded)
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
