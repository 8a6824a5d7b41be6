"""Hostile JSON on every POST route: a valid body with some of its values swapped for what JSON allows
and Python trips on: integers of hundreds or thousands of digits, 2**63, NaN / Infinity tokens, 1e400,
-0.0, lists and objects nested hundreds deep, and strings with unpaired UTF-16 surrogates (the \\ud800
escapes json.dumps writes for them). Whatever the body: no 5xx, and every refusal is the one error shape
as strict UTF-8 JSON. Bodies go out as raw bytes, so the test, not an HTTP client, writes the JSON text.

Bounded and derandomized (the same examples every run), so the module stays a few seconds of the suite;
tests/api/test_fuzz.py covers what the OpenAPI schema describes.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from service.api.errors import MAX_MESSAGE_CHARS
from service.app import create_app
from service.settings import ServiceSettings
from tests.helpers import make_registry

ADMIN_KEY = "hostile-admin-key"

_text = {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello world", "a"]}
_ids = {"name": "input_ids", "shape": [2, 3], "datatype": "INT64", "data": [[101, 7592, 102], [101, 102, 0]]}
_mask = {"name": "attention_mask", "shape": [2, 3], "datatype": "INT64", "data": [1, 1, 1, 1, 1, 0]}

# Valid bodies, one or more per route (test_templates_are_answered checks they are): the hostile
# examples keep most of a valid structure, so they reach past the schema into the route's own checks.
TEMPLATES: dict[str, list[dict]] = {
    "/v1/embeddings": [
        {"input": ["hello world", "x"], "model": "minilm", "encoding_format": "float", "dimensions": 4,
         "embedding_type": "float", "user": "u"},
        {"input": [[101, 7592, 102], [7592]], "encoding_format": "base64", "embedding_type": "binary"},
    ],
    "/embed": [{"inputs": ["hello", "world"], "normalize": True, "truncate": False,
                "truncation_direction": "Right", "model": "minilm", "embedding_type": "int8"}],
    "/predict": [{"inputs": ["good", "bad"], "model": "clf", "raw_scores": False, "truncate": True,
                  "truncation_direction": "Left"}],
    "/tokenize": [{"inputs": ["hello world"], "add_special_tokens": True, "model": "minilm"}],
    "/decode": [{"ids": [[101, 7592, 2088, 102], [7592]], "skip_special_tokens": True, "model": "minilm"},
                {"ids": [101, 7592, 102], "skip_special_tokens": False}],
    "/v2/models/minilm/infer": [
        {"id": "r1", "parameters": {"timeout": 5_000_000, "truncate": True, "binary_data_output": False},
         "inputs": [_text], "outputs": [{"name": "embedding", "parameters": {"binary_data": False}}]},
        {"inputs": [_ids, _mask, {**_mask, "name": "token_type_ids", "data": [0] * 6}]},
    ],
    "/v2/models/clf/infer": [
        {"id": "r2", "inputs": [{**_text, "shape": [2, 1], "data": [["good"], ["bad"]]}],
         "outputs": [{"name": "probabilities"}, {"name": "logits"}]},
        {"parameters": {"timeout": 1_000_000}, "inputs": [_ids, _mask]},
    ],
    "/v2/repository/index": [{"ready": True}],
    # A name the empty store does not hold: 404 once the body is read, and no model is unloaded.
    "/v2/repository/models/nope/load": [{"parameters": {}}],
    "/v2/repository/models/nope/unload": [{"parameters": {"unload_dependents": False}}],
}


class Raw:
    """JSON text put into the body as written: what json.dumps will not write (5000 digits, 1e400)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def render(body, escaped: bool = True) -> bytes:
    """JSON text of a body. escaped: non-ASCII as \\u escapes (lone surrogates too, as json.dumps writes
    them); otherwise as UTF-8, lone surrogates as the 3 bytes that Python's json.loads decodes back to one."""
    raws: list[str] = []

    def placeholder(value):
        if not isinstance(value, Raw):
            raise TypeError(type(value).__name__)
        raws.append(value.text)
        return f"@@raw{len(raws) - 1}@@"

    text = json.dumps(body, default=placeholder, ensure_ascii=escaped)  # NaN and Infinity as bare tokens
    for i, snippet in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', snippet, 1)
    return text.encode("utf-8", "surrogatepass")


LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])  # half a UTF-16 pair, as JSON can escape it
INTS = st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, 2 ** 63 - 1, -(2 ** 63) - 1, 2 ** 64, 2 ** 31, -1, 0, 1,
                        7592, 10 ** 18])
FLOATS = st.sampled_from([1e308, -1e308, -0.0, 0.0, 5e-324, 0.5, 1.0, float("nan"), float("inf"), float("-inf")])
STRINGS = st.one_of(
    LONE, st.sampled_from(["a\ud800b", "\udc00\ud800", "x\ud83d", "", "  ", "\x00", "é ü", "😀", "Right", "BYTES",
                           "INT64", "FP32", "text", "input_ids", "attention_mask", "embedding", "binary_data_size",
                           "timeout", "minilm", "clf"]),
    st.text(max_size=12),
)
RAW_NUMBERS = st.sampled_from([
    "1" + "0" * 5000,  # past Python's 4300-digit int() limit: json.loads itself refuses it
    "-" + "9" * 4300,  # just inside it: a Python int whose products and str() may not be
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0",
]).map(Raw)
RAW = st.one_of(RAW_NUMBERS, st.sampled_from([
    "[" * 300 + "1" + "]" * 300,
    "[" * 900 + "]" * 900,  # near the recursion limit of whatever walks it
    '{"a":' * 300 + "1" + "}" * 300,
    '"\\udfff\\ud800"',  # a reversed pair: two lone surrogates
]).map(Raw))
SCALARS = st.one_of(INTS, FLOATS, STRINGS, st.booleans(), st.none())
VALUES = st.one_of(
    SCALARS, RAW,
    st.lists(st.one_of(SCALARS, RAW), max_size=4),
    st.dictionaries(STRINGS, SCALARS, max_size=3),
)


def paths(node, prefix=()):
    """The path of every value in a body (dict keys and list indices), the body itself first."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, prefix + (i,))


def at(body, path):
    for step in path:
        body = body[step]
    return body


def twisted(draw, value):
    """A hostile value of the same JSON type, so that it passes the schema and reaches the route's code."""
    if isinstance(value, str):
        where = draw(st.integers(0, len(value)))
        return value[:where] + draw(LONE) + value[where:]
    if isinstance(value, bool) or value is None:
        return draw(SCALARS)
    if isinstance(value, int):
        return draw(st.one_of(INTS, RAW_NUMBERS))
    if isinstance(value, float):
        return draw(st.one_of(FLOATS, RAW_NUMBERS))
    if isinstance(value, list):
        depth = draw(st.sampled_from([2, 50, 300]))
        return Raw("[" * depth + render(value).decode() + "]" * depth)  # the same values, nested deeper
    return {**value, draw(STRINGS): draw(VALUES)}


@st.composite
def hostile_bodies(draw, route: str):
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(RAW, SCALARS))  # not an object at all: the route's body parsing, before any field
    body = copy.deepcopy(draw(st.sampled_from(TEMPLATES[route])))
    for _ in range(draw(st.integers(1, 3))):
        # Not the root (the body stays an object), nor inside what an earlier step made Raw text.
        path = draw(st.sampled_from([p for p in paths(body) if p]))
        parent, last = at(body, path[:-1]), path[-1]
        how = draw(st.sampled_from(["twist", "twist", "twist", "replace", "add"]))
        if how == "twist" and not isinstance(parent[last], Raw):
            parent[last] = twisted(draw, parent[last])
        elif how == "add" and isinstance(parent, dict):
            parent[draw(STRINGS)] = draw(VALUES)  # an extra (or replaced) key, maybe a lone surrogate
        elif how == "add":
            parent.append(draw(VALUES))
        else:
            parent[last] = draw(VALUES)
    return body


@pytest.fixture(scope="module")
def client():
    tmp = Path(tempfile.mkdtemp(prefix="bertserve-hostile-"))
    settings = ServiceSettings(model_store=tmp, max_inputs_per_request=16, max_body_bytes=20_000,
                               max_chars_per_text=5_000, max_queue_delay_ms=1, access_log=False,
                               admin_key=ADMIN_KEY)
    app = create_app(settings, registry=make_registry(tmp, settings))
    # A 500 must come back as a response to assert on, not as the server's exception in the test.
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def post(client, route: str, content: bytes):
    return client.post(route, content=content, headers={"content-type": "application/json",
                                                         "authorization": f"Bearer {ADMIN_KEY}"})


def assert_well_answered(resp) -> None:
    # A 503 "timeout" is the answer a client's own tiny parameters.timeout asks for, not a server fault.
    timed_out = resp.status_code == 503 and b'"type":"timeout"' in resp.content
    assert resp.status_code < 500 or timed_out, resp.text
    if resp.status_code >= 400:
        body = orjson.loads(resp.content)  # strict: UTF-8, and no lone surrogate escapes either
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"type", "message", "request_id"}, body
        assert all(isinstance(v, str) for v in body["error"].values()), body
        assert body["error"]["message"] and len(body["error"]["message"]) <= MAX_MESSAGE_CHARS
        assert body["error"]["request_id"] == resp.headers["x-request-id"]
    elif resp.headers.get("content-type", "").startswith("application/json"):
        orjson.loads(resp.content)


def test_an_error_quoting_a_lone_surrogate_is_valid_json(client):
    # The message quotes the parameter's name as sent; its lone surrogate is escaped, not a 500.
    resp = post(client, "/v2/repository/models/nope/load", b'{"parameters": {"x\\ud800": 1}}')
    assert resp.status_code == 422, resp.text
    assert "x\\ud800: unknown load parameter" in orjson.loads(resp.content)["error"]["message"]
    assert_well_answered(resp)


@pytest.mark.parametrize("content,says", [
    (b'{"input": 1' + b"0" * 5000 + b"}", "digits"),
    (b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nest"),
    (b'{"input": "\xff\xfe"}', "UTF-8"),
], ids=["5001 digits", "nested 5000 deep", "not UTF-8"])
def test_a_body_python_cannot_read_is_named(client, content, says):
    # Each is refused by json.loads with other than a syntax error; the answer still says what is wrong.
    resp = post(client, "/v1/embeddings", content)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == "invalid_input" and says in resp.json()["error"]["message"], resp.text
    assert_well_answered(resp)


@pytest.mark.parametrize("route", sorted(TEMPLATES))
def test_templates_are_answered(client, route):
    for body in TEMPLATES[route]:
        resp = post(client, route, render(body))
        # The repository templates name a model the store lacks: the body was read and found valid.
        assert resp.status_code == (404 if "/repository/models/" in route else 200), resp.text


@pytest.mark.parametrize("route", sorted(TEMPLATES))
@hypothesis_settings(max_examples=100, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_bodies_get_no_5xx_and_the_one_error_shape(client, route, data):
    body = data.draw(hostile_bodies(route), label="body")
    assert_well_answered(post(client, route, render(body, escaped=data.draw(st.booleans(), label="escaped"))))
