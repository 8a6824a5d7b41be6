"""Where a 2-bit graph's time goes: the kernel, or the unfused attention the 2-bit export needs?

    python -m bench.lowbit_speed --store STORE [--ternary minilm-ternary] [--fp32 minilm-lowbit-fp32]
                                 [--int8 minilm-lowbit-int8] [--rounds 3] [--out bench/reports/lowbit-speed.md]

From one published 2-bit variant (MatMulNBits bits=2, MultiHeadAttention) it makes, in memory:
- the same graph with ``accuracy_level`` 0 (fp32 activations: ONNX Runtime 1.32 then dequantizes each
  weight to fp32 at every call);
- the same graph with every MatMulNBits replaced by a MatMul of its dequantized fp32 weights (the same
  values, the same unfused attention), which separates the 2-bit kernel's cost from the attention's.
It times those three, the fused fp32 graph and the int8 variant of the same store at batch 1 (a short
text) and batch 32 x 128 tokens, in alternating blocks within each round, each block after one
untimed call. Prints and writes a Markdown table; never asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every 2-bit MatMulNBits (the build's packing: default zero point) as a MatMul of its fp32
    weights, bias added."""
    from build_models.steps.quantize import INT2_ZERO_POINT, unpack_2bit

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        if attrs["bits"] != 2:
            raise ValueError(f"{node.name}: bits={attrs['bits']}, this bench reads 2-bit graphs only")
        packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1, block // 4)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1, 1)
        codes = unpack_2bit(packed).astype(np.float32)  # [N, blocks, block]
        weight = ((codes - INT2_ZERO_POINT) * scales).reshape(n, -1)[:, :k]
        name = node.input[1] + "_fp32"
        out.graph.initializer.append(numpy_helper.from_array(weight.T.copy(), name))
        matmul_out = node.output[0] + ("_nobias" if len(node.input) > 5 and node.input[5] else "")
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [matmul_out], name=node.name + "_fp32"))
        if matmul_out != node.output[0]:
            nodes.append(helper.make_node("Add", [matmul_out, node.input[5]], [node.output[0]]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
                    break
            else:
                node.attribute.append(helper.make_attribute("accuracy_level", level))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--ternary", default="minilm-ternary")
    ap.add_argument("--fp32", default="minilm-lowbit-fp32")
    ap.add_argument("--int8", default="minilm-lowbit-int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/reports/lowbit-speed.md"))
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from transformers import AutoTokenizer

    from bench import procstat
    from build_models.corpora import load_split
    from service.backends.onnx import session_options
    from service.manifest import load_verified

    def latest(name: str) -> Path:
        versions = sorted((p for p in (args.store / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        return versions[-1]

    low = latest(args.ternary)
    manifest = load_verified(low)
    two_bit = onnx.load(str(low / manifest.model_file))
    threads = os.cpu_count() or 1
    graphs = {
        "2-bit, accuracy_level 4 (as built)": with_accuracy_level(two_bit, 4).SerializeToString(),
        "2-bit, accuracy_level 0": with_accuracy_level(two_bit, 0).SerializeToString(),
        "same values as fp32 MatMuls, unfused attention": dequantized(two_bit).SerializeToString(),
        "fused fp32 (packed Attention)": str(latest(args.fp32) / "model.onnx"),
        "int8 (fused)": str(latest(args.int8) / "model.onnx"),
    }
    sessions = {k: ort.InferenceSession(v, session_options(threads), providers=["CPUExecutionProvider"])
                for k, v in graphs.items()}
    tok = AutoTokenizer.from_pretrained(low / "tokenizer")
    texts = sorted(load_split("reuters-r8", "test").texts, key=len, reverse=True)[:32]
    cases = {"batch1_short": tok([" ".join(texts[0].split()[:8])], return_tensors="np"),
             "batch32_seq128": tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="np")}
    names = [i.name for i in manifest.inputs]
    feeds = {c: {n: enc[n].astype(np.int64) for n in names} for c, enc in cases.items()}
    out = {k: {c: [] for c in cases} for k in sessions}
    reference = None
    for case, feed in feeds.items():
        repeats = 20 if case == "batch1_short" else 3
        for _ in range(args.rounds):
            for key, sess in sessions.items():
                result = sess.run(None, feed)[0]  # untimed: absorbs the previous session's spinning threads
                if case == "batch32_seq128" and key.startswith("same values"):
                    reference = result
                for _ in range(repeats):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    out[key][case].append((time.perf_counter() - t) * 1000)
    check = sessions["2-bit, accuracy_level 0"].run(None, feeds["batch32_seq128"])[0]
    lines = [f"# 2-bit graph timings ({dt.date.today()})", "",
             f"`python -m bench.lowbit_speed --store {args.store}`; {threads} threads; {procstat.cpu_model()}; "
             f"{procstat.isa_text(procstat.isa())}; onnxruntime {ort.__version__}; median ms of {args.rounds} rounds.", "",
             "| graph | batch 1 ms | b32x128 ms | b32x128 vs fused fp32 |", "|---|---|---|---|"]
    fused = statistics.median(out["fused fp32 (packed Attention)"]["batch32_seq128"])
    for key, per_case in out.items():
        b1, b32 = (statistics.median(per_case[c]) for c in ("batch1_short", "batch32_seq128"))
        lines.append(f"| {key} | {b1:.2f} | {b32:.1f} | {fused / b32:.2f}x |")
    lines += ["", f"accuracy_level 0 against the fp32 MatMuls of the same values, b32x128: max |difference| "
                  f"{float(np.abs(check - reference).max()):.2e}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
