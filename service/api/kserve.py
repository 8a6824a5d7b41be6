"""KServe v2 / Open Inference Protocol routes (/v2/...), as spoken by tritonclient and KServe clients.

A model takes either one BYTES tensor of texts, which the server tokenizes, or INT64 ``input_ids`` with an
optional right-padding ``attention_mask``, and returns FP32 tensors: ``embedding`` for embedding models,
``logits`` and ``probabilities`` for classifiers. The binary tensor data extension is supported both ways.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Annotated, Callable, Coroutine, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service import routes
from service.api.common import call, model_entry, off_loop, state
from service.api.errors import ERROR_RESPONSES
from service.errors import InvalidInput, ModelNotFound, PayloadTooLarge, shown
from service.inputs import InferOptions, Inputs, unpaired_surrogate
from service.model_entry import ModelEntry
from service.outputs import softmax
from service.strict import StrictModel

BINARY_HEADER = "Inference-Header-Content-Length"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Triton's platform names, so tools that key on them recognise the model.
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}

# The protocol's dimensions and integer parameters are int64. JSON allows any integer (10**400), and
# Python computes with it until a float conversion overflows or a product outgrows str(): bounded here,
# where they enter, so that shape arithmetic and the messages quoting it stay small.
INT64_MAX = 2**63 - 1
# No model here takes more than 2 dimensions; the routes say so with a clearer message than this bound's.
MAX_RANK = 8
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
        None, description="truncate (bool, default false), binary_data_output (bool), timeout (microseconds)")
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


def _version_number(model: str, version: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", version):
        raise ModelNotFound(f"model {model!r} has no version {version!r}; versions are integers")
    return int(version)


def _entry(request: Request, model: str, version: str | None) -> ModelEntry:
    number = None if version is None else _version_number(model, version)
    return model_entry(request, model, number)


def _output_names(entry: ModelEntry) -> list[str]:
    return ["embedding"] if entry.manifest.task == "embedding" else ["logits", "probabilities"]


def _output_width(entry: ModelEntry) -> int:
    m = entry.manifest
    width = m.embedding_dim if m.task == "embedding" else (len(m.labels) if m.labels else None)
    if width is None and m.outputs and isinstance(m.outputs[0].shape[-1], int):
        width = m.outputs[0].shape[-1]
    return width if width is not None else -1


def _metadata(request: Request, entry: ModelEntry) -> dict:
    registry = state(request).registry
    versions = sorted(e.version for (n, _), e in registry.entries.items() if n == entry.name and e.ready)
    token_inputs = [n for n in TOKEN_INPUTS if n != "token_type_ids" or n in entry.input_names]
    width = _output_width(entry)
    return {
        "name": entry.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORMS.get(entry.manifest.format, entry.manifest.format),
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        + [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in token_inputs],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, width]} for n in _output_names(entry)],
    }


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict:
    extensions = ["binary_tensor_data"]
    if state(request).settings.admin_secret:
        # Advertised only where it answers: without an admin key the repository routes are off (403).
        extensions.append("model_repository")
    return {"name": "bertserve", "version": state(request).version, "extensions": extensions}


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


@dataclass
class _Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: Any  # list[str] for BYTES, flat int64 ndarray for INT64


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


def _split_bytes(name: str, raw: bytes) -> list[str]:
    """BYTES binary data: each element is a little-endian uint32 length followed by its bytes."""
    texts, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{name}: binary BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"{name}: binary BYTES element {len(texts)} claims {size} bytes past the end")
        try:
            texts.append(raw[offset: offset + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{name}[{len(texts)}] is not valid UTF-8 text") from None
        offset += size
    return texts


def _decode(inp: RequestInput, raw: bytes | None) -> _Tensor:
    name, datatype = inp.name, inp.datatype
    if datatype == "BYTES":
        if raw is not None:
            values: Any = _split_bytes(name, raw)
        else:
            values = _flatten(inp.data)
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise InvalidInput(f"{name}: BYTES data must be strings; item {bad} is {type(values[bad]).__name__}")
    elif datatype == "INT64":
        if raw is not None:
            if len(raw) % 8:
                raise InvalidInput(f"{name}: {len(raw)} bytes of INT64 data is not a whole number of 8-byte values")
            values = np.frombuffer(raw, dtype="<i8").astype(np.int64)
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
        raise InvalidInput(f"{name}: datatype {datatype!r} is not supported; send texts as BYTES or token ids "
                           f"(input_ids, attention_mask, token_type_ids) as INT64")
    expected = math.prod(inp.shape)
    if len(values) != expected:
        raise InvalidInput(f"{name}: shape {inp.shape} holds {expected} values but {len(values)} were sent")
    return _Tensor(name, datatype, list(inp.shape), values)


def _read_inputs(inputs: list[RequestInput], tail: bytes) -> list[_Tensor]:
    if not inputs:
        raise InvalidInput("inputs is empty: send one BYTES tensor of texts or an INT64 input_ids tensor")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"inputs name the same tensor twice: {names}")
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


def _token_rows(tensors: dict[str, _Tensor], max_rows: int) -> list[list[int]]:
    """input_ids [N, T] to one id list per row, cut at the attention mask's trailing zeros."""
    unknown = sorted(set(tensors) - set(TOKEN_INPUTS))
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r}; send texts as one BYTES tensor or token ids as "
                           f"INT64 {', '.join(TOKEN_INPUTS)}")
    if "input_ids" not in tensors:
        raise InvalidInput("input_ids is missing: token inputs need an INT64 input_ids tensor of shape [N, T]")
    ids_t = tensors["input_ids"]
    if len(ids_t.shape) != 2:
        raise InvalidInput(f"input_ids must have shape [N, T]; got {ids_t.shape}")
    for t in tensors.values():
        if t.shape != ids_t.shape:
            raise InvalidInput(f"{t.name} has shape {t.shape} but input_ids has {ids_t.shape}; they must match")
    n, width = ids_t.shape
    # Counted before any array is shaped: [10**12, 0] and [0, 10**12] hold no values, as many as were
    # sent, yet a list of the one's rows or a mask as wide as the other's would never be built.
    if n == 0:
        return []  # encode_ids answers that the batch is empty
    if n > max_rows:
        raise PayloadTooLarge(f"input_ids has {n} items; at most {max_rows} per request")
    ids = ids_t.values.reshape(n, width)
    if "token_type_ids" in tensors and tensors["token_type_ids"].values.any():
        # Every served model is single-sequence; honouring segment ids would need pair inputs end to end.
        raise InvalidInput("token_type_ids must be all 0: sentence pairs are not supported")
    if "attention_mask" not in tensors:
        return ids.tolist()
    mask = tensors["attention_mask"].values.reshape(n, width)
    if not np.isin(mask, (0, 1)).all():
        raise InvalidInput("attention_mask may only hold 0 and 1")
    lengths = mask.sum(axis=1)
    # Right padding only: a row must be ones then zeros, so its real tokens are the first `length`.
    ragged = np.nonzero((mask != (np.arange(width) < lengths[:, None])).any(axis=1))[0]
    if len(ragged):
        raise InvalidInput(f"attention_mask row {ragged[0]} has a 0 before a 1; only right padding "
                           f"(trailing zeros) is supported")
    return [ids[i, : lengths[i]].tolist() for i in range(n)]


def _inputs(tensors: list[_Tensor], max_rows: int) -> Inputs:
    """The request's texts (one BYTES tensor) or token-id rows (INT64 input_ids and its companions)."""
    texts = [t for t in tensors if t.datatype == "BYTES"]
    if texts:
        if len(tensors) > 1:
            raise InvalidInput(f"send either one BYTES tensor of texts or INT64 token ids; got "
                               f"{', '.join(f'{t.name} ({t.datatype})' for t in tensors)}")
        text = texts[0]
        if len(text.shape) not in (1, 2) or (len(text.shape) == 2 and text.shape[1] != 1):
            raise InvalidInput(f"{text.name} must have shape [N] or [N, 1]; got {text.shape}")
        return Inputs.of_texts(text.values, text.name)
    return Inputs.of_ids(_token_rows({t.name: t for t in tensors}, max_rows), "input_ids")


# ------------------------------------------------------------------ parameters and outputs


def _flag(params: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}parameters.{key} must be true or false, got {shown(value)}")
    return value


def _timeout_s(params: dict[str, Any]) -> float | None:
    """Triton's `timeout` parameter (microseconds); None lets X-Request-Timeout or the setting apply."""
    value = params.get("timeout")
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= INT64_MAX:
        # Bounded before the division: a float overflows on an integer such as 10**400, which JSON allows.
        raise InvalidInput(f"parameters.timeout must be a positive int64 number of microseconds, "
                           f"got {shown(value)}")
    return value / 1e6  # common.call caps it at the server's request_timeout_s


def _wanted_outputs(entry: ModelEntry, outputs: list[RequestOutput] | None, binary: bool) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return, in the order asked for."""
    names = _output_names(entry)
    if outputs is None:
        return [(n, binary) for n in names]
    if not outputs:
        raise InvalidInput(f"outputs is empty; omit it for all outputs or name some of: {', '.join(names)}")
    wanted = []
    for out in outputs:
        if out.name not in names:
            raise InvalidInput(f"unknown output {out.name!r}; model {entry.name!r} has: {', '.join(names)}")
        if any(n == out.name for n, _ in wanted):
            raise InvalidInput(f"output {out.name!r} is asked for twice")
        params = out.parameters or {}
        if "classification" in params or "shared_memory_region" in params:
            raise InvalidInput(f"output {out.name!r}: the classification and shared memory extensions are "
                               f"not supported")
        wanted.append((out.name, _flag(params, "binary_data", f"outputs[{out.name}].", binary)))
    return wanted


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
    truncate = _flag(params, "truncate", "")
    wanted = _wanted_outputs(entry, body.outputs, _flag(params, "binary_data_output", ""))
    timeout_s = _timeout_s(params)
    # Decoding a tensor walks every value in Python: off the event loop when the request is large.
    tensors = await off_loop(request, getattr(request, "payload_bytes", 0), _read_inputs, body.inputs,
                             getattr(request, "binary_tail", b""))
    inputs = _inputs(tensors, state(request).settings.max_inputs_per_request)
    rows = (await entry.infer(inputs, InferOptions(truncate=truncate), call(request, timeout_s))).rows
    results = {"embedding": rows} if entry.manifest.task == "embedding" else \
        {"logits": rows, "probabilities": softmax(rows)}
    return _response(entry, body.id, results, wanted)


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
