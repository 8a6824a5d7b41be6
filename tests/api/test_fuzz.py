"""schemathesis against the service's own OpenAPI schema, on a live server over fake backends: whatever
a client sends within (or just outside) the schema, no 5xx, and every answer matches its documented
schema. Bounded examples per operation, so it stays a minute of the suite; a longer run is marked slow.
The model repository routes are fuzzed too, with the admin key, over an empty store: nothing there to
load, and a made-up name to unload is a 404. tests/api/test_hostile_bodies.py sends what the schema
cannot describe: huge integers, NaN, deep nesting and lone surrogates in raw JSON."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (dev extra)")
from hypothesis import HealthCheck, settings as hypothesis_settings  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests.helpers import LiveServer, make_registry  # noqa: E402


ADMIN_KEY = "fuzz-admin-key"


def _live_server() -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bertserve-fuzz-"))
    settings = ServiceSettings(model_store=tmp, max_inputs_per_request=16, max_body_bytes=20_000,
                               max_chars_per_text=5_000, access_log=False, admin_key=ADMIN_KEY)
    # Never stopped: a daemon thread that lives as long as the test process.
    return LiveServer(create_app(settings, registry=make_registry(tmp, settings))).url


BASE = _live_server()
# A body over the byte limit is refused with 413 before it is validated: a rejection of invalid data as
# much as a 422 is, though not in schemathesis's default list for negative_data_rejection.
CONFIG = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]}}})
schema = schemathesis.openapi.from_url(f"{BASE}/openapi.json", config=CONFIG)


def _call_and_validate(case) -> None:
    # Excluded: "schema-valid request rejected". Empty and whitespace-only texts are schema-valid strings
    # that this server refuses with 422 by design (docs/serving.md, Errors), as OpenAI and TEI do.
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])


@schema.parametrize()
@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_every_answer_matches_the_schema(case):
    _call_and_validate(case)


# The same at length, for `make test` (`make test-fast` leaves it out); other examples too, as Hypothesis
# derandomizes by the test's name. 300 per operation ran in 90 s on a 2-core machine.
RUNS_LONG = 300


@pytest.mark.slow
@schema.parametrize()
@hypothesis_settings(max_examples=RUNS_LONG, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_every_answer_matches_the_schema_at_length(case):
    _call_and_validate(case)
