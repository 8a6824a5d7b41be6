"""The bench tools a latency claim rests on: the in-process ceiling's arrangements run every batch
exactly once and agree on the answer; the stage budget's stages add up to what the client saw."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ceiling import Arrangement
from bench.stages import AFTER, Marks, budget, stage_plan


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """A one-node ONNX graph (input_ids -> float sum per row), enough for sessions to run."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["as_float"], ["sums"], keepdims=0)],
        "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("sums", TensorProto.FLOAT, [])])
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


@pytest.mark.parametrize("sessions,threads", [(1, 2), (2, 1), (3, 1)])
def test_every_arrangement_runs_each_batch_once(tiny_graph, sessions, threads):
    arrangement = Arrangement(tiny_graph, sessions, threads)
    assert len(arrangement.sessions) == sessions and arrangement.threads == threads
    batches = [np.full((2, 3), k, dtype=np.int64) for k in range(25)]
    seen, by_session = [], set()

    def embed(session, batch):
        by_session.add(id(session))
        seen.append(float(session.run(["sums"], {"input_ids": batch})[0]))

    arrangement.run(batches, embed)
    assert sorted(seen) == [6.0 * k for k in range(25)]  # each batch once, run by a real session
    assert by_session <= {id(s) for s in arrangement.sessions}


def test_stage_budget_telescopes_to_the_client_latency():
    layers = ["Outer (x)", "Inner (x)", "Router (x)"]
    plan = stage_plan(layers)
    # The server's stamps in the order the plan meets them, one millisecond apart, then "done".
    order = []
    for _, start, end in plan:
        for label in (start, end):
            if label not in order and not label.startswith("client"):
                order.append(label)
    marks, client = Marks(), {}
    for n in range(5):
        sent = 10.0 * n
        marks.start(str(n))
        for k, label in enumerate(order, 1):
            marks.current.append(("run solo" if label == "run" else label, sent + k * 0.001))
        marks.current.append(("done", sent + (len(order) + 2) * 0.001))
        client[str(n)] = (sent, sent + (len(order) + 1) * 0.001)
    result = budget(marks, client, layers, skip=1)
    assert result["requests"] == 4 and result["sessions"] == {"solo": 4}
    assert all(s["p50_us"] == pytest.approx(1000) for s in result["stages"])
    total = sum(stage["mean_us"] for stage in result["stages"])
    assert total == pytest.approx(result["total"]["mean_us"])  # the stages add up to the client's latency
    assert result["after"][0]["stage"] == AFTER[0][0]
    assert [s["stage"] for s in result["stages"]][:3] == ["receive + parse HTTP (client send -> app called)",
                                                          "layer Outer (x)", "layer Inner (x)"]
