"""The window arithmetic of service/long_input.py: what every long input's answer rests on."""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from service.long_input import Layout, new_tokens, window_count, window_spans


@given(length=st.integers(1, 5000), room=st.integers(1, 512), overlap=st.integers(0, 1000))
def test_windows_cover_the_input_once_each_token_at_most_twice(length, room, overlap):
    spans = window_spans(length, room, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(0 < end - start <= room for start, end in spans)
    assert len(spans) == window_count(length, room, overlap)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 <= e0 < e1  # no gap, and every window brings new tokens
        assert e0 - s1 == min(overlap, room // 2)  # the overlap, capped at half a window
    counts = new_tokens(spans)
    assert sum(counts) == length and all(c > 0 for c in counts)


def test_a_short_input_is_one_window():
    assert window_spans(10, 254, 32) == [(0, 10)] and window_count(10, 254, 32) == 1


def test_combine_weights_rows_by_new_tokens_and_renormalises():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=np.float32)
    layout = Layout(counts=[2, 1], weights=np.array([3.0, 1.0, 7.0]))
    raw = layout.combine(rows, normalize=False)
    np.testing.assert_allclose(raw, [[0.75, 0.25], [3.0, 3.0]])
    unit = layout.combine(rows, normalize=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
