"""`python -m bench.stages` on a real server: every probe finds its place in the request path (a
renamed method would leave a stage without stamps), and the stages add up to the client's latency."""

from __future__ import annotations

import pytest

from bench.stages import measure


def test_stage_budget_of_a_live_server_adds_up(tiny_store):
    result = measure(tiny_store, "tiny", requests=30, skip=5)
    budget = result["budget"]
    assert budget["requests"] == 25  # every request had every stamp
    assert sum(budget["sessions"].values()) == 25
    stages = {s["stage"]: s for s in budget["stages"]}
    assert any("LoadShedder (bertserve)" in name for name in stages)
    assert stages["inference (session.run)"]["p50_us"] > 0
    assert sum(s["mean_us"] for s in budget["stages"]) == pytest.approx(budget["total"]["mean_us"])
    assert result["floor"]["total"]["p50_us"] > 0
