"""Checks `frankensplit export-onnx --part encoder` in ONNX Runtime: the graph
passes onnx's checker, and on random inputs (batch 1 and 2) its output equals
the reference's g_a module (tools/bench/edge_reference.py's Encoder, the
reference's `QuantizableSimpleAnalysisNetwork2`) loaded with the same
bundle's weights, within 1e-4 of the output's scale.

    frankensplit export-onnx --model demo --part encoder -o encoder.onnx
    python3 tools/onnx/check_encoder.py --model ~/.cache/frankensplit/models/*/demo-l0.64 encoder.onnx
    (needs torch, safetensors, onnx, onnxruntime)
"""

import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from edge_reference import load  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_file")
    parser.add_argument("--model", required=True, help="the bundle directory the graph was exported from")
    args = parser.parse_args()

    onnx.checker.check_model(onnx.load(args.onnx_file), full_check=True)
    encoder, _, side = load(args.model)
    session = ort.InferenceSession(args.onnx_file, providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    for batch in (1, 2):
        x = torch.randn(batch, 3, side, side)
        with torch.no_grad():
            want = encoder(x).numpy()
        got = session.run(["latent"], {"image": x.numpy()})[0]
        assert got.shape == want.shape, (got.shape, want.shape)
        scale = float(np.abs(want).max())
        worst = float(np.abs(got - want).max())
        assert worst <= 1e-4 * scale, f"batch {batch}: differs by {worst} (scale {scale})"
        print(f"batch {batch}: latent {list(got.shape)}, max |ONNX Runtime - PyTorch| = {worst:.2e} (scale {scale:.2f})")
    print(f"ok: ONNX Runtime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
