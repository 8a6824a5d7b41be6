"""The Open Inference Protocol (KServe v2) apart from its transport: what the HTTP routes
(service/api/kserve.py) and the gRPC service (service/api/grpc_service.py) share, as functions of plain
values.

Reading tensors (BYTES texts, INT64 token ids with their right-padding mask) into ``Inputs``, the
request's parameters into ``InferOptions`` and a timeout, which outputs to return, the outputs of a
model's rows, and a model's metadata. Both transports call these, so one request means the same thing,
and is refused with the same message, whichever way it came.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from service.errors import InvalidInput, ModelNotFound, PayloadTooLarge, shown
from service.inputs import InferOptions, Inputs
from service.long_input import POLICIES
from service.model_entry import ModelEntry
from service.outputs import softmax

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Triton's platform names, so tools that key on them recognise the model.
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}

# The protocol's dimensions and integer parameters are int64. JSON allows any integer (10**400), and
# Python computes with it until a float conversion overflows or a product outgrows str(): bounded here,
# where they enter, so that shape arithmetic and the messages quoting it stay small.
INT64_MAX = 2**63 - 1
# No model here takes more than 2 dimensions; the routes say so with a clearer message than this bound's.
MAX_RANK = 8


# ------------------------------------------------------------------ models and metadata


def version_number(model: str, version: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", version):
        raise ModelNotFound(f"model {model!r} has no version {version!r}; versions are integers")
    return int(version)


def output_names(entry: ModelEntry) -> list[str]:
    return ["embedding"] if entry.manifest.task == "embedding" else ["logits", "probabilities"]


def output_width(entry: ModelEntry) -> int:
    m = entry.manifest
    width = m.embedding_dim if m.task == "embedding" else (len(m.labels) if m.labels else None)
    if width is None and m.outputs and isinstance(m.outputs[0].shape[-1], int):
        width = m.outputs[0].shape[-1]
    return width if width is not None else -1


def metadata(registry, entry: ModelEntry) -> dict:
    """The model metadata answer: versions that serve, platform, input and output tensors."""
    versions = sorted(e.version for (n, _), e in registry.entries.items() if n == entry.name and e.ready)
    token_inputs = [n for n in TOKEN_INPUTS if n != "token_type_ids" or n in entry.input_names]
    width = output_width(entry)
    return {
        "name": entry.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORMS.get(entry.manifest.format, entry.manifest.format),
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        + [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in token_inputs],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, width]} for n in output_names(entry)],
    }


def extensions(admin_key_set: bool) -> list[str]:
    """The server metadata's extensions: the repository only where it answers (without an admin key
    its routes and RPCs are off)."""
    return ["binary_tensor_data", "model_repository"] if admin_key_set else ["binary_tensor_data"]


# ------------------------------------------------------------------ tensors


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: Any  # list[str] for BYTES, flat int64 ndarray for INT64


def check_shape(name: str, shape: Sequence[int]) -> list[int]:
    """A shape as a transport without a schema sends it (gRPC's repeated int64): JSON's is validated by
    its schema to the same bounds."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{name}: shape has {len(shape)} dimensions; at most {MAX_RANK}")
    bad = next((d for d in shape if not 0 <= d <= INT64_MAX), None)
    if bad is not None:
        raise InvalidInput(f"{name}: shape {list(shape)} has a negative dimension")
    return list(shape)


def unsupported_datatype(name: str, datatype: str) -> InvalidInput:
    return InvalidInput(f"{name}: datatype {shown(datatype)} is not supported; send texts as BYTES or token "
                        f"ids (input_ids, attention_mask, token_type_ids) as INT64")


def split_bytes(name: str, raw: bytes) -> list[str]:
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


def decode_texts(name: str, items: Iterable[bytes]) -> list[str]:
    """BYTES elements one by one (gRPC's bytes_contents): UTF-8 text each."""
    texts = []
    for i, item in enumerate(items):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{name}[{i}] is not valid UTF-8 text") from None
    return texts


def int64_from_bytes(name: str, raw: bytes) -> np.ndarray:
    """INT64 binary data: little-endian 8-byte values."""
    if len(raw) % 8:
        raise InvalidInput(f"{name}: {len(raw)} bytes of INT64 data is not a whole number of 8-byte values")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def tensor(name: str, datatype: str, shape: list[int], values: Any) -> Tensor:
    """A decoded tensor, once its value count is what its shape holds."""
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidInput(f"{name}: shape {shape} holds {expected} values but {len(values)} were sent")
    return Tensor(name, datatype, list(shape), values)


def check_names(names: Sequence[str]) -> None:
    """An infer request's input names: some, each once."""
    if not names:
        raise InvalidInput("inputs is empty: send one BYTES tensor of texts or an INT64 input_ids tensor")
    if len(set(names)) != len(names):
        raise InvalidInput(f"inputs name the same tensor twice: {list(names)}")


def token_rows(tensors: dict[str, Tensor], max_rows: int) -> list[list[int]]:
    """input_ids [N, T] to one id list per row, cut at the attention mask's trailing zeros."""
    unknown = sorted(set(tensors) - set(TOKEN_INPUTS))
    if unknown:
        raise InvalidInput(f"unknown input {shown(unknown[0])}; send texts as one BYTES tensor or token ids as "
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


def to_inputs(tensors: list[Tensor], max_rows: int) -> Inputs:
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
    return Inputs.of_ids(token_rows({t.name: t for t in tensors}, max_rows), "input_ids")


# ------------------------------------------------------------------ parameters and outputs


def flag(params: Mapping[str, Any], key: str, where: str = "", default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}parameters.{key} must be true or false, got {shown(value)}")
    return value


def infer_options(params: Mapping[str, Any]) -> InferOptions:
    """The request's parameters that change what inference does, as ``InferOptions``: the one
    translation both transports use. ``long_input`` (error | truncate | window) wins over ``truncate``
    (true is truncate, false is error); absent, the model's or the server's rule applies.
    ``truncation_direction`` (right | left) says which end truncation cuts; ``prompt_name`` names one of
    the model's sentence-transformers prompts."""
    return InferOptions(long_input=_choice(params, "long_input", POLICIES),
                        truncate=flag(params, "truncate") if "truncate" in params else None,
                        direction=_choice(params, "truncation_direction", ("right", "left")) or "right",
                        prompt_name=_text(params, "prompt_name"))


def _choice(params: Mapping[str, Any], key: str, allowed: Sequence[str]) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in allowed:
        raise InvalidInput(f"parameters.{key} must be one of {', '.join(allowed)}; got {shown(value)}")
    return value.lower()


def _text(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"parameters.{key} must be a string, got {shown(value)}")
    return value


def timeout_s(params: Mapping[str, Any]) -> float | None:
    """Triton's `timeout` parameter (microseconds) in seconds; None when absent (the transport's own
    deadline or the setting applies). Capped at the server's request_timeout_s by the caller."""
    value = params.get("timeout")
    if value is None:
        return None
    if type(value) is not int or not 0 < value <= INT64_MAX:
        # Bounded before the division: a float overflows on an integer such as 10**400, which JSON allows.
        raise InvalidInput(f"parameters.timeout must be a positive int64 number of microseconds, "
                           f"got {shown(value)}")
    return value / 1e6


def wanted_outputs(entry: ModelEntry, requested: Sequence[tuple[str, Mapping[str, Any]]] | None,
                   binary: bool) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return, in the order asked for; ``requested`` is each
    requested output's (name, parameters), or None for all."""
    names = output_names(entry)
    if requested is None:
        return [(n, binary) for n in names]
    if not requested:
        raise InvalidInput(f"outputs is empty; omit it for all outputs or name some of: {', '.join(names)}")
    wanted = []
    for name, params in requested:
        if name not in names:
            raise InvalidInput(f"unknown output {shown(name)}; model {entry.name!r} has: {', '.join(names)}")
        if any(n == name for n, _ in wanted):
            raise InvalidInput(f"output {name!r} is asked for twice")
        if "classification" in params or "shared_memory_region" in params:
            raise InvalidInput(f"output {name!r}: the classification and shared memory extensions are "
                               f"not supported")
        wanted.append((name, flag(params, "binary_data", f"outputs[{name}].", binary)))
    return wanted


def results(entry: ModelEntry, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The model's output rows as the protocol's output tensors."""
    if entry.manifest.task == "embedding":
        return {"embedding": rows}
    return {"logits": rows, "probabilities": softmax(rows)}
