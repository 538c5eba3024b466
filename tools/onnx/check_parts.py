"""Checks a graph of `frankensplit export-onnx` in ONNX Runtime against the tch
model that exported it: onnx's checker (full_check, with strict shape
inference) accepts the graph, and ONNX Runtime's output on the check data's
input (the whole batch, and its first sample alone, so that the symbolic
batch dimension is exercised) equals the tch model's output stored next to
it within 1e-4 of the output's scale (max |value|).

    frankensplit export-onnx --model demo --part decoder -o decoder.onnx --check-data decoder.safetensors
    frankensplit export-onnx --model demo --part tail -o tail.onnx --check-data tail.safetensors
    python3 tools/onnx/check_parts.py decoder.onnx decoder.safetensors
    python3 tools/onnx/check_parts.py tail.onnx tail.safetensors
    (needs numpy, onnx, onnxruntime, safetensors; works for --part encoder too)
"""

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from safetensors import safe_open


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_file")
    parser.add_argument("check_data", help="the file export-onnx --check-data wrote for this graph")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="allowed max difference over max |output|")
    args = parser.parse_args()

    with safe_open(args.check_data, "np") as f:
        meta = f.metadata()
        x = f.get_tensor(meta["input"])
        want = f.get_tensor(meta["output"])
    model = onnx.load(args.onnx_file)
    onnx.checker.check_model(model, full_check=True)
    graph_io = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    assert graph_io == ([meta["input"]], [meta["output"]]), f"graph {graph_io}, check data {meta}"

    session = ort.InferenceSession(args.onnx_file, providers=["CPUExecutionProvider"])
    scale = float(np.abs(want).max())
    worst_overall = 0.0
    for label, inputs, expected in (("batch", x, want), ("first sample", x[:1], want[:1])):
        got = session.run([meta["output"]], {meta["input"]: inputs})[0]
        assert got.shape == expected.shape, (label, got.shape, expected.shape)
        worst = float(np.abs(got - expected).max())
        worst_overall = max(worst_overall, worst)
        print(
            f"{meta['part']}, {label}: {meta['output']} {list(got.shape)}, "
            f"max |ONNX Runtime - tch| = {worst:.3e} (scale {scale:.3f}, relative {worst / scale:.2e})"
        )
        assert worst <= args.tolerance * scale, f"{label}: differs by {worst} (scale {scale})"
    if meta["part"] == "tail":
        got = session.run([meta["output"]], {meta["input"]: x})[0]
        assert (got.argmax(1) == want.argmax(1)).all(), "the predicted classes differ"
    print(
        f"ok: {args.onnx_file}, {len(model.graph.node)} nodes, max difference {worst_overall:.3e} "
        f"= {worst_overall / scale:.2e} of the scale; ONNX Runtime {ort.__version__}, onnx {onnx.__version__}"
    )


if __name__ == "__main__":
    main()
