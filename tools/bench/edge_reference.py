"""Times the reference's edge side in Python on this machine, for comparison
with `frankensplit bench edge` run in the same session:

- g_a (the reference's `QuantizableSimpleAnalysisNetwork2`: three
  `ResidualBlockWithStride`, 3 -> 48 -> 64 -> 48, no activation between the
  convolutions, as released) at batch 1, 224x224, in PyTorch eager (NCHW and
  channels_last) and in ONNX Runtime (the module exported with torch.onnx);
- CompressAI's `EntropyBottleneck.compress` of the resulting 48x28x28 latent;
- the machine's sgemm peak (torch.matmul of 1024x1024 matrices);

each at 1 and 2 threads, median of --iterations runs after --warmup.

Weights: random (seed 0), or g_a and the entropy bottleneck of a bundle
(`--model DIR`, its weights.safetensors) for the real tables.

    python3 -m venv /tmp/eb && /tmp/eb/bin/pip install torch==2.11.0 compressai==1.2.8 \
        safetensors onnx onnxruntime
    /tmp/eb/bin/python tools/bench/edge_reference.py --iterations 50 --json out.json

--ours BINARY interleaves our side: after each thread count's measurements
it runs `BINARY bench edge --threads N --json` (same iterations, the same
--model) and records ours (folded + Winograd) and our coding next to ONNX
Runtime + CompressAI, so that the ratio compares timings seconds apart (this
machine's speed drifts by up to 50 % over minutes); --rounds R repeats it all.

    tools/bench/edge_reference.py --ours target/release/frankensplit --rounds 3 --json out.json

--ours-edge BINARY does the same with the device binary alone (`BINARY
bench --model DIR --threads N --json`, no libtorch; needs --model), for
machines where only this script's Python packages and that binary are. Both
record our int8 encoder too (its speed-up over PyTorch channels_last is the
int8 target's figure).

    tools/bench/edge_reference.py --model full-random/ --ours-edge target/release/frankensplit-edge

Where CompressAI has no wheel (the device image's Python 3.12), build it
there from its sdist and point --compressai-target at the result:

    python3 -m pip install --no-deps --no-build-isolation --target /tmp/cai compressai-1.2.8.tar.gz
    tools/bench/edge_reference.py --compressai-target /tmp/cai --model full-edge/ --ours-edge frankensplit-edge

--save-onnx PATH keeps the exported graph at PATH and writes, next to it, the
input (`<PATH without .onnx>.input.npy`), PyTorch's output (`.torch.npy`) and
ONNX Runtime's output at the first thread count (`.ort.npy`), for other
engines to time and check on the same graph (tools/bench/tract/compare.sh).
"""

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn


class ResidualBlockWithStride(nn.Module):
    """compressai.layers.ResidualBlockWithStride as the reference builds it
    (its `act1` ends up an identity)."""

    def __init__(self, in_ch, out_ch, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = nn.ReLU(inplace=False)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride)

    def forward(self, x):
        out = self.conv1(x)
        out = self.act(self.conv2(out))
        return out + self.skip(x)


class Encoder(nn.Module):
    def __init__(self, widths=(3, 48, 64, 48)):
        super().__init__()
        self.rb1 = ResidualBlockWithStride(widths[0], widths[1])
        self.rb2 = ResidualBlockWithStride(widths[1], widths[2])
        self.rb3 = ResidualBlockWithStride(widths[2], widths[3])

    def forward(self, x):
        return self.rb3(self.rb2(self.rb1(x)))


def median_ms(fn, warmup, iterations):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def compressai_without_init(target):
    """Makes `compressai.entropy_models` and CompressAI's compiled coder
    importable from `target` (a `pip install --no-deps --target TARGET`
    of CompressAI's sdist) without running compressai/__init__.py, whose
    imports (pandas, torch_geometric, PIL, ...) a bare device image lacks:
    the package module becomes a stub with what the entropy models ask of it."""
    import os
    import sys
    import types

    package = types.ModuleType("compressai")
    package.__path__ = [os.path.join(target, "compressai")]
    package.get_entropy_coder = lambda: "ans"
    package.available_entropy_coders = lambda: ["ans"]
    sys.modules["compressai"] = package
    from compressai import ans

    package.ans = ans


def load(model_dir, with_compressai=True):
    """g_a, CompressAI's entropy bottleneck (None without CompressAI) and the input side."""
    if with_compressai:
        from compressai.entropy_models import EntropyBottleneck
    if model_dir is None:
        torch.manual_seed(0)
        encoder = Encoder().eval()
        eb = None
        if with_compressai:
            eb = EntropyBottleneck(48)
            eb.update(force=True)
        return encoder, eb, 224
    from safetensors.torch import load_file

    tensors = load_file(f"{model_dir}/weights.safetensors")
    g_a = {k[len("compressor.g_a."):]: v for k, v in tensors.items() if k.startswith("compressor.g_a.")}
    widths = (3, g_a["rb1.conv1.weight"].shape[0], g_a["rb2.conv1.weight"].shape[0], g_a["rb3.conv1.weight"].shape[0])
    encoder = Encoder(widths).eval()
    encoder.load_state_dict(g_a)
    eb = None
    if with_compressai:
        eb = EntropyBottleneck(widths[3])
        prefix = "compressor.entropy_bottleneck."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        eb.load_state_dict(state, strict=False)
        eb.update(force=True)
    import tomllib

    with open(f"{model_dir}/model.toml", "rb") as f:
        side = tomllib.load(f)["architecture"]["compressor"]["input_size"]
    return encoder, eb, side


def ours_report(args, threads, run):
    """Runs our bench (`frankensplit bench edge` or `frankensplit-edge
    bench`) and adds its figures to `run`."""
    import subprocess

    if args.ours:
        command = [args.ours, "bench", "edge", "--threads", str(threads), "--json"]
        if args.model:
            command += ["--model", args.model]
    else:
        command = [args.ours_edge, "bench", "--model", args.model, "--threads", str(threads), "--json"]
    command += ["--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    ours = next(m for m in report["encoder"] if "Winograd" in m["name"])
    int8 = next(m for m in report["encoder"] if "int8" in m["name"])
    run["ours_ms"] = ours["ms"]
    run["ours_int8_ms"] = int8["ms"]
    run["ours_int8_kernels"] = report.get("int8_kernels")
    run["ours_coding_ms"] = report["coding_ms"]
    if "max_abs_difference" in ours:
        run["ours_max_abs_difference_from_libtorch"] = ours["max_abs_difference"]


def add_ratios(run):
    """Our speed-ups, once `run` holds both sides' timings."""
    ours_total = run["ours_ms"] + run["ours_coding_ms"]
    if "compressai_compress_ms" in run:
        run["speedup_vs_onnxruntime_compressai"] = (run["onnxruntime_ms"] + run["compressai_compress_ms"]) / ours_total
    run["speedup_vs_channels_last"] = run["pytorch_channels_last_ms"] / run["ours_ms"]
    run["int8_speedup_vs_channels_last"] = run["pytorch_channels_last_ms"] / run["ours_int8_ms"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: random weights)")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--save-onnx", metavar="PATH", help="keep the ONNX export here, with its input and outputs as .npy")
    parser.add_argument("--ours", metavar="BINARY", help="frankensplit binary to time right after each measurement")
    parser.add_argument("--ours-edge", metavar="BINARY", help="frankensplit-edge binary to time instead (needs --model)")
    parser.add_argument(
        "--no-compressai", action="store_true", help="skip CompressAI's coder (for machines without it)"
    )
    parser.add_argument(
        "--compressai-target",
        metavar="DIR",
        help="load CompressAI's entropy models and coder from DIR, a `pip install --no-deps "
        "--no-build-isolation --target DIR compressai-1.2.8.tar.gz`, without its package "
        "imports (for machines with torch, numpy and scipy but no CompressAI wheel)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement this many times")
    args = parser.parse_args()
    if args.ours_edge and not args.model:
        parser.error("--ours-edge needs --model (the device binary reads a bundle)")
    if args.compressai_target:
        if args.no_compressai:
            parser.error("--compressai-target and --no-compressai exclude each other")
        compressai_without_init(args.compressai_target)

    encoder, eb, side = load(args.model, not args.no_compressai)
    torch.manual_seed(1)
    x = torch.randn(1, 3, side, side)
    # Multiply-adds, counted from the output shapes of each convolution.
    macs = 0
    hooks = []

    def count(module, inputs, output):
        nonlocal macs
        macs += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        latent = encoder(x)
    for h in hooks:
        h.remove()

    results = {"input": [1, 3, side, side], "latent": list(latent.shape), "macs": macs, "runs": []}
    onnx_path = args.save_onnx or tempfile.mktemp(suffix=".onnx")
    stem = onnx_path[: -len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path
    if args.save_onnx:
        import numpy as np

        np.save(f"{stem}.input.npy", x.numpy())
        np.save(f"{stem}.torch.npy", latent.numpy())
        results["onnx"] = onnx_path
    torch.onnx.export(encoder, x, onnx_path, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    import onnxruntime as ort

    rounds = [(r, int(t)) for r in range(args.rounds) for t in args.threads.split(",")]
    for round_index, threads in rounds:
        torch.set_num_threads(threads)
        run = {"round": round_index, "threads": threads}
        # Odd rounds time ours first, so that the machine's drift within a
        # round does not always fall on the same side.
        ours_first = round_index % 2 == 1
        run["ours_first"] = ours_first
        if (args.ours or args.ours_edge) and ours_first:
            ours_report(args, threads, run)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        run["peak_gflops"] = 2 * 1024**3 / median_ms(lambda: a @ b, 2, 7) / 1e6
        with torch.no_grad():
            run["pytorch_eager_ms"] = median_ms(lambda: encoder(x), args.warmup, args.iterations)
            cl_encoder = encoder.to(memory_format=torch.channels_last)
            cl_x = x.to(memory_format=torch.channels_last)
            run["pytorch_channels_last_ms"] = median_ms(lambda: cl_encoder(cl_x), args.warmup, args.iterations)
            encoder.to(memory_format=torch.contiguous_format)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        ort_out = session.run(None, feed)[0]
        run["onnxruntime_max_abs_difference"] = float((torch.from_numpy(ort_out) - latent).abs().max())
        if args.save_onnx and len(results["runs"]) == 0:
            np.save(f"{stem}.ort.npy", ort_out)
        run["onnxruntime_ms"] = median_ms(lambda: session.run(None, feed), args.warmup, args.iterations)
        if eb is not None:
            run["compressai_compress_ms"] = median_ms(lambda: eb.compress(latent), args.warmup, args.iterations)
            run["string_bytes"] = len(eb.compress(latent)[0])
        if (args.ours or args.ours_edge) and not ours_first:
            ours_report(args, threads, run)
        if args.ours or args.ours_edge:
            add_ratios(run)
        results["runs"].append(run)
        line = (
            f"round {round_index}, {threads} thread(s): peak {run['peak_gflops']:.1f} GFLOP/s | g_a: eager {run['pytorch_eager_ms']:.2f} ms, "
            f"channels_last {run['pytorch_channels_last_ms']:.2f} ms, ONNX Runtime {run['onnxruntime_ms']:.2f} ms"
        )
        if eb is not None:
            line += f" | CompressAI compress {run['compressai_compress_ms']:.2f} ms ({run['string_bytes']} B)"
        if args.ours or args.ours_edge:
            line += f" | ours {run['ours_ms']:.2f} ms + coding {run['ours_coding_ms']:.2f} ms"
            if eb is not None:
                line += f": {run['speedup_vs_onnxruntime_compressai']:.2f}x ONNX Runtime + CompressAI"
            line += (
                f", g_a {run['speedup_vs_channels_last']:.2f}x channels_last | "
                f"ours int8 ({run['ours_int8_kernels']}) {run['ours_int8_ms']:.2f} ms: "
                f"{run['int8_speedup_vs_channels_last']:.2f}x channels_last"
            )
        print(line, flush=True)
    print(f"{macs / 1e6:.1f} M multiply-adds; ONNX Runtime {ort.__version__}, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
