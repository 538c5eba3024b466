"""Times ONNX Runtime (CPU, one thread by default) on an ONNX graph with one
f32 input, and writes that input and ONNX Runtime's output as .npy files for
`tract-bench --input ... --reference ...` (tools/bench/tract/compare.sh).

With --model BUNDLE (the bundle the graph was exported from, e.g. by
`frankensplit export-onnx --part encoder`), also checks ONNX Runtime's output
against the reference's g_a in PyTorch (tools/bench/edge_reference.py's
Encoder with the bundle's weights) and writes PyTorch's output.

    python3 tools/bench/tract/ort_reference.py encoder.onnx --model BUNDLE --stem /tmp/enc
    (writes /tmp/enc.input.npy, /tmp/enc.ort.npy, /tmp/enc.torch.npy; prints JSON)
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_file")
    parser.add_argument("--stem", required=True, help="write STEM.input.npy, STEM.ort.npy (and STEM.torch.npy)")
    parser.add_argument("--model", help="bundle directory the graph was exported from (for the PyTorch check)")
    parser.add_argument("--side", type=int, help="input side (default: the bundle's input_size, else 224)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    encoder = None
    side = args.side or 224
    if args.model:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from edge_reference import load

        encoder, _, bundle_side = load(args.model)
        side = args.side or bundle_side
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, side, side), dtype=np.float32)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx_file, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    out = session.run(None, feed)[0]
    np.save(f"{args.stem}.input.npy", x)
    np.save(f"{args.stem}.ort.npy", out)
    result = {"onnx": args.onnx_file, "input": list(x.shape), "output": list(out.shape), "threads": args.threads}
    if encoder is not None:
        import torch

        with torch.no_grad():
            want = encoder(torch.from_numpy(x)).numpy()
        np.save(f"{args.stem}.torch.npy", want)
        result["onnxruntime_max_abs_difference_vs_pytorch"] = float(np.abs(out - want).max())

    for _ in range(args.warmup):
        session.run(None, feed)
    samples = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1e3)
    result.update(
        onnxruntime=ort.__version__,
        iterations=args.iterations,
        median_ms=statistics.median(samples),
        min_ms=min(samples),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
