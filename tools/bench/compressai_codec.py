#!/usr/bin/env python3
"""Time CompressAI's entropy coder against ours on the same latent and tables.

Runs `frankensplit bench codec --export CASE --json` (ours), loads the exported
tables, medians and latent into a CompressAI EntropyBottleneck, checks that
CompressAI's string equals ours byte for byte, times
`EntropyBottleneck.compress` / `.decompress` (batch 1, CPU, one thread), and
prints both sets of numbers with the ratios. Everything runs in this one
invocation on this machine.

    python3 tools/bench/compressai_codec.py [--binary target/release/frankensplit] [--iterations 200]

Needs torch and compressai (see tools/fixtures/gen_codec_fixtures.py).
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from compressai.entropy_models import EntropyBottleneck


def median_ms(fn, warmup, iterations):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="target/release/frankensplit")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        case_path = Path(tmp) / "case.json"
        ours = json.loads(subprocess.run(
            [args.binary, "bench", "codec", "--json", "--export", str(case_path),
             "--iterations", str(args.iterations), "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True).stdout)
        case = json.loads(case_path.read_text())

    c, h, w = case["shape"]["channels"], case["shape"]["height"], case["shape"]["width"]
    eb = EntropyBottleneck(c)
    cdf = torch.tensor(case["quantized_cdf"], dtype=torch.int32).reshape(c, case["cdf_width"])
    eb._quantized_cdf = cdf
    eb._cdf_length = torch.tensor(case["cdf_length"], dtype=torch.int32)
    eb._offset = torch.tensor(case["offset"], dtype=torch.int32)
    with torch.no_grad():
        eb.quantiles[:, 0, 1] = torch.tensor(case["medians"])
    eb.eval()
    latent = torch.tensor(case["latent"], dtype=torch.float32).reshape(1, c, h, w)

    strings = eb.compress(latent)
    assert strings[0].hex() == case["string_hex"], "CompressAI's string differs from ours"
    decoded = eb.decompress(strings, (h, w))
    assert torch.equal(torch.round(decoded - eb.quantiles[:, 0, 1].reshape(1, c, 1, 1)),
                       torch.round(latent - eb.quantiles[:, 0, 1].reshape(1, c, 1, 1)))

    with torch.no_grad():
        theirs_compress = median_ms(lambda: eb.compress(latent), args.warmup, args.iterations)
        theirs_decompress = median_ms(lambda: eb.decompress(strings, (h, w)), args.warmup, args.iterations)

    result = {
        "shape": [c, h, w],
        "string_bytes": len(strings[0]),
        "identical_strings": True,
        "compressai_version": __import__("compressai").__version__,
        "compressai_compress_ms": theirs_compress,
        "compressai_decompress_ms": theirs_decompress,
        "ours_compress_ms": ours["compress_ms_median"],
        "ours_decompress_ms": ours["decompress_ms_median"],
        "compress_speedup": theirs_compress / ours["compress_ms_median"],
        "decompress_speedup": theirs_decompress / ours["decompress_ms_median"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"latent {c}x{h}x{w}, string {result['string_bytes']} B, identical bytes from both coders")
        print(f"{'':12}{'CompressAI ' + result['compressai_version']:>18}{'frankensplit':>14}{'speed-up':>10}")
        print(f"{'compress':12}{theirs_compress:15.3f} ms{ours['compress_ms_median']:11.3f} ms{result['compress_speedup']:9.1f}x")
        print(f"{'decompress':12}{theirs_decompress:15.3f} ms{ours['decompress_ms_median']:11.3f} ms{result['decompress_speedup']:9.1f}x")


if __name__ == "__main__":
    main()
