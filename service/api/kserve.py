"""KServe v2 / Open Inference Protocol routes (/v2/...), as spoken by tritonclient and KServe clients.

A model takes either one BYTES tensor of texts, which the server tokenizes, or INT64 ``input_ids`` with an
optional right-padding ``attention_mask``, and returns FP32 tensors: ``embedding`` for embedding models,
``logits`` and ``probabilities`` for classifiers. The binary tensor data extension is supported both ways.
What the protocol means apart from HTTP (tensors, parameters, outputs, metadata) is service/api/oip.py's,
shared with the gRPC service (service/api/grpc_service.py).
"""

from __future__ import annotations

import json
import re
from typing import Any, Annotated, Callable, Coroutine, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service import routes
from service.api import oip
from service.api.common import call, model_entry, off_loop, state
from service.api.errors import ERROR_RESPONSES
from service.api.oip import INT64_MAX, MAX_RANK
from service.errors import InvalidInput, shown
from service.inputs import unpaired_surrogate
from service.model_entry import ModelEntry
from service.strict import StrictModel

BINARY_HEADER = "Inference-Header-Content-Length"
Dim = Annotated[int, Field(ge=0, le=INT64_MAX)]


# ------------------------------------------------------------------ schemas


class RequestInput(StrictModel):
    name: str = Field(min_length=1)
    shape: list[Dim] = Field(max_length=MAX_RANK)
    datatype: str = Field(description="BYTES for texts, INT64 for input_ids / attention_mask / token_type_ids")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the data follows the JSON")
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class RequestOutput(StrictModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: return this output as raw bytes")


class InferenceRequest(StrictModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="long_input (error | truncate | window; default: the model's, else BERTSERVE_LONG_INPUT), "
                          "truncate (bool: true is long_input truncate, false is error), truncation_direction "
                          "(right | left), prompt_name (a sentence-transformers prompt of the model), "
                          "binary_data_output (bool), timeout (microseconds)")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="outputs to return; all when omitted")

    @field_validator("id")
    @classmethod
    def _echoable(cls, value: str | None) -> str | None:
        # The id is echoed in the answer: one UTF-8 cannot encode is refused here, rather than answered
        # with a different id.
        at = None if value is None else unpaired_surrogate(value)
        if at is not None:
            raise ValueError(f"id holds an unpaired UTF-16 surrogate at character {at}; it must be "
                             f"valid Unicode, as it is echoed in the response")
        return value


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


# ------------------------------------------------------------------ binary tensor data


class _InferRequest(Request):
    """The JSON part of an infer request, labelled JSON: OIP clients send no or any Content-Type
    (curl -d says form-urlencoded, tritonclient says nothing), which FastAPI would otherwise refuse."""

    def __init__(self, request: Request, head: bytes, tail: bytes):
        headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
        scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
        super().__init__(scope, request.receive)
        self._head, self.binary_tail = head, tail

    @property
    def payload_bytes(self) -> int:
        return len(self._head) + len(self.binary_tail)

    async def body(self) -> bytes:
        return self._head

    async def json(self) -> Any:
        # Megabytes of numbers take the json module a quarter of a second: off the event loop when large.
        if not hasattr(self, "_json"):
            self._json = await off_loop(self, len(self._head), json.loads, self._head)
        return self._json


class _InferRoute(APIRoute):
    """Splits the body into JSON and the binary tensor data that follows it (the binary extension)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def split(request: Request) -> Response:
            raw = await request.body()
            declared = request.headers.get(BINARY_HEADER)
            if declared is None:
                return await handler(_InferRequest(request, raw, b""))
            if not re.fullmatch(r"\s*[0-9]{1,12}\s*", declared) or int(declared) > len(raw):
                raise InvalidInput(f"{BINARY_HEADER} is {declared!r}; it must be the length of the JSON part "
                                   f"of a {len(raw)}-byte body")
            return await handler(_InferRequest(request, raw[: int(declared)], raw[int(declared):]))

        return split


class JsonRoute(APIRoute):
    """Reads the body as JSON whatever its Content-Type says, for the other OIP routes that take one
    (the model repository extension): tritonclient sends none, curl -d says form-urlencoded."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def relabel(request: Request) -> Response:
            return await handler(_InferRequest(request, await request.body(), b""))

        return relabel


router = APIRouter(tags=["KServe v2"], responses=ERROR_RESPONSES)


# ------------------------------------------------------------------ metadata and health


def _entry(request: Request, model: str, version: str | None) -> ModelEntry:
    number = None if version is None else oip.version_number(model, version)
    return model_entry(request, model, number)


def _metadata(request: Request, entry: ModelEntry) -> dict:
    return oip.metadata(state(request).registry, entry)


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict:
    # The repository is advertised only where it answers: without an admin key its routes are off (403).
    return {"name": "bertserve", "version": state(request).version,
            "extensions": oip.extensions(bool(state(request).settings.admin_secret))}


@router.get(routes.KSERVE_LIVE)
async def server_live() -> dict:
    return {"live": True}


@router.get(routes.KSERVE_READY, responses={503: {"description": "no model is ready"}})
async def server_ready(request: Request) -> dict:
    state(request).registry.check_ready()
    return {"ready": True}


@router.get("/v2/models/{model}", response_model=ModelMetadata)
async def model_metadata(model: str, request: Request) -> dict:
    return _metadata(request, _entry(request, model, None))


@router.get("/v2/models/{model}/versions/{version}", response_model=ModelMetadata)
async def model_version_metadata(model: str, version: str, request: Request) -> dict:
    return _metadata(request, _entry(request, model, version))


@router.get("/v2/models/{model}/ready", responses={503: {"description": "model not ready"}})
async def model_ready(model: str, request: Request) -> dict:
    state(request).registry.check_ready(_entry(request, model, None))  # raises 404 / 503
    return {"name": model, "ready": True}


@router.get("/v2/models/{model}/versions/{version}/ready", responses={503: {"description": "model not ready"}})
async def model_version_ready(model: str, version: str, request: Request) -> dict:
    state(request).registry.check_ready(_entry(request, model, version))
    return {"name": model, "ready": True}


# ------------------------------------------------------------------ decoding inputs


def _flatten(data: list) -> list:
    # Iterative: nested lists arrive from JSON already bounded, but recursion depth is not ours to spend.
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _decode(inp: RequestInput, raw: bytes | None) -> oip.Tensor:
    """One JSON input tensor: its ``data`` (flat or nested), or ``raw``, its binary data."""
    name, datatype = inp.name, inp.datatype
    if datatype == "BYTES":
        if raw is not None:
            values: Any = oip.split_bytes(name, raw)
        else:
            values = _flatten(inp.data)
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise InvalidInput(f"{name}: BYTES data must be strings; item {bad} is {type(values[bad]).__name__}")
    elif datatype == "INT64":
        if raw is not None:
            values = oip.int64_from_bytes(name, raw)
        else:
            flat = _flatten(inp.data)
            # bool is an int to Python but not a token id; floats would be silently truncated by numpy.
            bad = next((i for i, v in enumerate(flat) if type(v) is not int), None)
            if bad is not None:
                raise InvalidInput(f"{name}: INT64 data must be integers; item {bad} is {type(flat[bad]).__name__}")
            try:
                values = np.asarray(flat, dtype=np.int64)
            except OverflowError:
                raise InvalidInput(f"{name}: a value does not fit in INT64") from None
    else:
        raise oip.unsupported_datatype(name, datatype)
    return oip.tensor(name, datatype, inp.shape, values)


def _read_inputs(inputs: list[RequestInput], tail: bytes) -> list[oip.Tensor]:
    oip.check_names([i.name for i in inputs])
    tensors, offset = [], 0
    for inp in inputs:
        params = inp.parameters or {}
        if "shared_memory_region" in params:
            raise InvalidInput(f"{inp.name}: shared memory is not supported; send the data in the request")
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if type(size) is not int or not 0 <= size <= INT64_MAX:
                raise InvalidInput(f"{inp.name}: binary_data_size must be a non-negative int64, got {shown(size)}")
            if inp.data is not None:
                raise InvalidInput(f"{inp.name}: has both data and binary_data_size; send one")
            if offset + size > len(tail):
                raise InvalidInput(f"{inp.name}: binary_data_size {size} runs past the end of the binary data "
                                   f"({len(tail)} bytes after the JSON; is {BINARY_HEADER} set?)")
            raw, offset = tail[offset: offset + size], offset + size
        elif inp.data is None:
            raise InvalidInput(f"{inp.name}: has no data")
        tensors.append(_decode(inp, raw))
    if offset != len(tail):
        raise InvalidInput(f"{len(tail) - offset} bytes of binary data follow the JSON that no input claims")
    return tensors


def _wanted_outputs(entry: ModelEntry, outputs: list[RequestOutput] | None, binary: bool) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return, in the order asked for."""
    requested = None if outputs is None else [(out.name, out.parameters or {}) for out in outputs]
    return oip.wanted_outputs(entry, requested, binary)


def _response(entry: ModelEntry, request_id: str | None, results: dict[str, np.ndarray],
              wanted: list[tuple[str, bool]]) -> Response:
    outputs, chunks = [], []
    for name, binary in wanted:
        array = np.ascontiguousarray(results[name], dtype="<f4")
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            chunks.append(array.tobytes())
            out["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    body: dict[str, Any] = {"model_name": entry.name, "model_version": str(entry.version)}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = outputs
    head = orjson.dumps(body)
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(chunks), media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(len(head))})


# ------------------------------------------------------------------ inference


async def _infer(request: Request, model: str, version: str | None, body: InferenceRequest) -> Response:
    entry = _entry(request, model, version)
    params = body.parameters or {}
    options = oip.infer_options(params)
    wanted = _wanted_outputs(entry, body.outputs, oip.flag(params, "binary_data_output"))
    timeout_s = oip.timeout_s(params)  # common.call caps it at the server's request_timeout_s
    # Decoding a tensor walks every value in Python: off the event loop when the request is large.
    tensors = await off_loop(request, getattr(request, "payload_bytes", 0), _read_inputs, body.inputs,
                             getattr(request, "binary_tail", b""))
    inputs = oip.to_inputs(tensors, state(request).settings.max_inputs_per_request)
    rows = (await entry.infer(inputs, options, call(request, timeout_s))).rows
    return _response(entry, body.id, oip.results(entry, rows), wanted)


_INFER_DOC = dict(
    response_model=InferenceResponse,
    responses={200: {"content": {"application/octet-stream": {}},
                     "description": f"JSON, or with binary outputs JSON of {BINARY_HEADER} bytes then raw data"}},
    route_class_override=_InferRoute,
    methods=["POST"],
)


async def infer(model: str, body: InferenceRequest, request: Request) -> Response:
    """Embed or classify a batch of texts or token id rows."""
    return await _infer(request, model, None, body)


async def infer_version(model: str, version: str, body: InferenceRequest, request: Request) -> Response:
    """Embed or classify with one version of a model."""
    return await _infer(request, model, version, body)


router.add_api_route(routes.KSERVE_INFER, infer, **_INFER_DOC)
router.add_api_route(routes.KSERVE_VERSION_INFER, infer_version, **_INFER_DOC)
