"""Ternary and binary weights (build_models/qat.py) and their 2-bit export (quantize int2_weight_only),
on small tensors and one-node graphs: the quantization rule, the straight-through gradients, freezing,
the 2-bit packing and what ONNX Runtime computes from it. Needs torch (unlike the rest of tests/unit):
the modules under test are PyTorch modules."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from build_models.artifact import Artifact, BuildContext  # noqa: E402
from build_models.errors import BuildError  # noqa: E402
from build_models.qat import LowBitLinear, freeze, projection_names, quantize_linears  # noqa: E402
from build_models.recipe import QatConfig, QuantizeConfig, parse_recipe  # noqa: E402
from build_models.steps import quantize  # noqa: E402
from build_models.steps.quantize import int2_matmuls, pack_2bit, two_bit_grid, unpack_2bit  # noqa: E402

CASES = [("ternary", "channel"), ("ternary", "block"), ("binary", "channel"), ("binary", "block")]
IN, OUT, BLOCK = 64, 24, 16


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def expected_weight(w: np.ndarray, weights: str, granularity: str, block: int = BLOCK) -> np.ndarray:
    """The stated rule, written out independently in float64: per output channel (or per block of
    ``block`` input columns of it), ternary: Δ = 0.7·mean|W|, α = mean |W| over |W| > Δ, W_q = α·sign(W)
    where |W| > Δ else 0; binary: α = mean|W|, W_q = ±α (+ for W >= 0)."""
    w = w.astype(np.float64)
    out = np.zeros_like(w)
    group = w.shape[1] if granularity == "channel" else block
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[row, start:start + group]
            if weights == "ternary":
                kept = np.abs(g) > 0.7 * np.abs(g).mean()
                alpha = np.abs(g[kept]).mean()
                out[row, start:start + group] = alpha * np.sign(g) * kept
            else:
                out[row, start:start + group] = np.abs(g).mean() * np.where(g >= 0, 1.0, -1.0)
    return out


@pytest.mark.parametrize("weights,granularity", CASES)
def test_forward_is_x_times_the_quantized_weight_plus_bias(weights, granularity):
    lin = linear()
    layer = LowBitLinear(lin, weights, granularity, BLOCK)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # the latent weight is the Linear's own
    want = expected_weight(lin.weight.detach().numpy(), weights, granularity)
    got = layer.quantized_weight().detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # float32 means against float64 ones
    x = torch.randn(5, 7, IN)
    with torch.no_grad():
        y = layer(x).numpy()
    ref = x.double().numpy() @ want.T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("weights,granularity", CASES)
def test_quantized_values_are_exactly_alpha_times_a_code(weights, granularity):
    layer = LowBitLinear(linear(1), weights, granularity, BLOCK)
    wq = layer.quantized_weight().detach()
    group = IN if granularity == "channel" else BLOCK
    groups = wq.reshape(OUT, IN // group, group)
    for row in groups.reshape(-1, group):
        magnitudes = set(row.abs().tolist()) - {0.0}
        assert len(magnitudes) == 1  # one α per group, and each value is exactly ±α or 0
        alpha = magnitudes.pop()
        codes = set((row / alpha).tolist())
        assert codes <= ({-1.0, 0.0, 1.0} if weights == "ternary" else {-1.0, 1.0})
    if weights == "ternary":
        assert (wq == 0).any()  # TWN's threshold zeroes the small weights


def test_straight_through_gradients_train_the_latent_weight():
    torch.manual_seed(0)
    layer = LowBitLinear(linear(2), "ternary", "block", BLOCK)
    target_layer = LowBitLinear(linear(3), "ternary", "block", BLOCK)
    x = torch.randn(64, IN)
    with torch.no_grad():
        target = target_layer(x)

    def loss():
        return ((layer(x) - target) ** 2).mean()

    first = loss()
    first.backward()
    grad = layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Identity STE: the latent weight's gradient is the quantized weight's gradient, dL/dW_q = G^T x.
    residual = 2 * (layer(x) - target).detach() / target.numel()
    torch.testing.assert_close(grad, residual.T @ x)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first.item()


def tiny_embedding_model():
    from transformers import BertConfig, BertModel

    from build_models.modeling import EmbeddingModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    return EmbeddingModel(BertModel(config, add_pooling_layer=False), "mean", True).eval()


def test_quantize_linears_replaces_the_projections_only_and_freeze_keeps_the_outputs():
    model = tiny_embedding_model()
    replaced = quantize_linears(model, "ternary", "channel", keep_fp32=["*.layer.0.*"])
    # Layer 1's six projections; layer 0 kept; no embedding, pooler or head.
    assert replaced == [f"encoder.encoder.layer.1.{n}" for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    assert len(projection_names(model)) == 12
    assert isinstance(model.encoder.encoder.layer[0].attention.self.query, nn.Linear)
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        before = model(ids, mask)
    frozen = freeze(model)
    assert not any(isinstance(m, LowBitLinear) for m in frozen.modules())
    query = frozen.encoder.encoder.layer[1].attention.self.query
    assert type(query) is nn.Linear
    assert set(query.weight.abs().flatten().tolist()) - {0.0}  # ternary values, now plain weights
    with torch.no_grad():
        assert torch.equal(frozen(ids, mask), before)
    with pytest.raises(ValueError, match="keep_fp32 pattern '\\*.layer.7.\\*' matches no projection"):
        quantize_linears(tiny_embedding_model(), "binary", keep_fp32=["*.layer.7.*"])
    with pytest.raises(ValueError, match="does not divide"):
        quantize_linears(tiny_embedding_model(), "binary", "block", block_size=48)


def test_two_bit_packing_round_trips_with_the_first_code_in_the_low_bits():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(5, 3, 32)).astype(np.uint8)
    packed = pack_2bit(codes)
    assert packed.shape == (5, 3, 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_2bit(packed), codes)
    assert pack_2bit(np.array([[[1, 2, 3, 0]]], dtype=np.uint8))[0, 0, 0] == 0b00_11_10_01


@pytest.mark.parametrize("weights,codes", [("ternary", {1, 2, 3}), ("binary", {1, 3})])
def test_frozen_weights_lie_on_the_two_bit_grid_with_their_own_scales(weights, codes):
    lin = freeze(LowBitLinear(linear(4), weights, "block", 32))
    w = lin.weight.detach().numpy().T  # a MatMul's B: [K, N]
    grid = two_bit_grid(w, 32)
    assert grid is not None
    found, scales = grid
    assert set(np.unique(found).tolist()) == codes
    # value = (code - 2)·scale reproduces every weight exactly
    rebuilt = ((found.astype(np.float32) - 2) * scales[..., None]).reshape(OUT, IN).T
    np.testing.assert_array_equal(rebuilt, w)
    # Channel α are on every block grid too (one scale repeated); a block that is not: off the grid.
    assert two_bit_grid(freeze(LowBitLinear(linear(5), weights)).weight.detach().numpy().T, 32) is not None
    assert two_bit_grid(w, 64) is None  # two α in one 64-block
    assert two_bit_grid(linear(6).weight.detach().numpy().T, 32) is None


def matmul_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x [B, S, K] -> one MatMul per weight, chained (each weight [K, K])."""
    k = next(iter(weights.values())).shape[0]
    nodes, inits, current = [], [], "x"
    for name, w in weights.items():
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [current, f"{name}.weight"], [f"{name}.out"], name=name))
        current = f"{name}.out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["b", "s", k])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_graph(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_matmul_nbits_two_bit_node_computes_what_numpy_does():
    torch.manual_seed(0)
    w = freeze(LowBitLinear(nn.Linear(128, 128), "ternary", "block", 32)).weight.detach().numpy().T.copy()
    model = matmul_graph({"proj": w})
    converted, skipped = int2_matmuls(model, 32)
    assert (converted, skipped) == (1, [])
    node = model.graph.node[0]
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "K": 128, "N": 128, "bits": 2, "block_size": 32, "accuracy_level": 0}
    assert [i.name for i in model.graph.initializer] == ["proj.weight_int2", "proj.weight_int2_scales"]
    x = np.random.default_rng(1).standard_normal((2, 5, 128)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    # accuracy_level 0: the codes dequantized to fp32, then SGEMM: only float32 summation rounding
    # (|y| ~ 1, 128 terms) separates it from the float64 product.
    np.testing.assert_allclose(run_graph(model, x), want, atol=1e-5)
    # accuracy_level 4: int8 activations per block of 32 on AVX-512 CPUs (exact fp32 elsewhere): within
    # 2% of the output range, the size of one int8 step of each block's activations summed over K.
    model4 = matmul_graph({"proj": w})
    int2_matmuls(model4, 32, accuracy_level=4)
    np.testing.assert_allclose(run_graph(model4, x), want, atol=0.02 * np.abs(want).max())


def test_off_grid_weights_stay_matmul_and_nothing_on_the_grid_is_an_error(tmp_path):
    torch.manual_seed(0)
    on_grid = freeze(LowBitLinear(nn.Linear(64, 64), "binary")).weight.detach().numpy().T.copy()
    off_grid = nn.Linear(64, 64).weight.detach().numpy().T.copy()
    model = matmul_graph({"quantized": on_grid, "fp32": off_grid})
    x = np.random.default_rng(2).standard_normal((1, 3, 64)).astype(np.float32)
    converted, skipped = int2_matmuls(model, 32)
    assert (converted, skipped) == (1, ["fp32"])
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "MatMul"]
    np.testing.assert_allclose(run_graph(model, x), x @ on_grid @ off_grid, atol=1e-5)

    path = tmp_path / "fp32.onnx"
    onnx.save(matmul_graph({"a": off_grid, "b": off_grid * 2}), str(path))
    ctx = BuildContext(source=None, task="embedding", tokenizer=None, work_dir=tmp_path, max_seq_len=8,
                       provider="cpu", sample_texts=[])
    art = Artifact(kind="onnx", path=path, input_names=["x"], output_name="b.out")
    with pytest.raises(BuildError, match="no MatMul weight lies on a 2-bit grid.*put a qat step before the export"):
        quantize.run(QuantizeConfig(method="int2_weight_only"), art, ctx)
    with pytest.raises(BuildError, match="power-of-two block_size, got 48"):
        quantize.run(QuantizeConfig(method="int2_weight_only", block_size=48), art, ctx)
    # int8 embedding tables need the fused embedding node that optimize makes; a graph without one is
    # refused by name rather than published with its tables silently left in fp32.
    onnx.save(matmul_graph({"q": on_grid}), str(tmp_path / "grid.onnx"))
    art = Artifact(kind="onnx", path=tmp_path / "grid.onnx", input_names=["x"], output_name="q.out")
    with pytest.raises(BuildError, match="embeddings: int8 needs the fused EmbedLayerNormalization"):
        quantize.run(QuantizeConfig(method="int2_weight_only", embeddings="int8"), art, ctx)


def test_qat_config_and_order_rules():
    assert QatConfig(weights="ternary").num_layers is None  # neither given: every layer
    assert QatConfig(weights="binary", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="at most one of num_layers or layers"):
        QatConfig(weights="ternary", num_layers=2, layers=[0, 1])
    with pytest.raises(ValueError, match="multiple of 16"):
        QatConfig(weights="ternary", granularity="block", block_size=40)
    with pytest.raises(ValueError, match="accuracy_level applies to int4_weight_only and int2_weight_only"):
        QuantizeConfig(method="int8_dynamic", accuracy_level=4)
    with pytest.raises(ValueError, match="embeddings: int8 applies to int4_weight_only and int2_weight_only"):
        QuantizeConfig(method="int8_dynamic", embeddings="int8")
    recipe = {"family": "t", "source": {"path": "/x"}, "task": "embedding", "variants": [
        {"name": "v", "steps": [{"qat": {"weights": "ternary"}}, "export_onnx",
                                {"optimize": {"attention": "multi_head"}},
                                {"quantize": {"method": "int2_weight_only", "accuracy_level": 4}}]}]}
    steps = parse_recipe(recipe).variants[0].steps
    assert [s.step for s in steps] == ["qat", "export_onnx", "optimize", "quantize"]
    recipe["variants"][0]["steps"] = ["export_onnx", {"qat": {"weights": "ternary"}}]
    with pytest.raises(Exception, match="qat trains the PyTorch model: put it before the export"):
        parse_recipe(recipe)
