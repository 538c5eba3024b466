#!/usr/bin/env python3
"""Time the `frankensplit` Python package's coder against CompressAI's, in one
Python process, on the same latents and tables.

The tables are those CompressAI 1.2.8's `update()` built for the 48-channel
EntropyBottleneck of the codec fixture (crates/codec/tests/fixtures/
compressai_codec.json); the latents are 48×28×28 (FrankenSplit's), drawn
as Laplacians around the medians (seeded). Both coders get the same tables;
the script checks that their strings are identical before timing. Batch 1 and
16; `compress(y) -> list[bytes]` and `decompress(strings, (28, 28))` on
both sides (CompressAI on CPU, `torch.set_num_threads(1)`; ours codes a
batch on all cores with the GIL released). Several rounds, each the median of
`--iterations` calls; the ratios are per round.

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch==2.11.0 compressai==1.2.8 maturin
    /tmp/fx/bin/maturin build --release -m crates/python/Cargo.toml -o target/wheels
    /tmp/fx/bin/pip install --force-reinstall --no-deps target/wheels/frankensplit-*.whl
    /tmp/fx/bin/python tools/bench/python_codec.py [--rounds 5] [--iterations 50] [--json]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck as CompressAIBottleneck

import frankensplit

ROOT = Path(__file__).resolve().parents[2]


def median_s(fn, warmup, iterations):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def coders():
    fixture = json.loads((ROOT / "crates/codec/tests/fixtures/compressai_codec.json").read_text())["entropy_bottleneck"]
    tables, medians = fixture["tables_direct"], np.array(fixture["medians"], dtype=np.float32)
    c = fixture["channels"]
    width = max(len(row) for row in tables["quantized_cdf"])
    cdf = np.zeros((c, width), dtype=np.int32)
    for i, row in enumerate(tables["quantized_cdf"]):
        cdf[i, : len(row)] = row
    ours = frankensplit.EntropyBottleneck.from_tables(cdf, tables["cdf_length"], tables["offset"], medians)
    theirs = CompressAIBottleneck(c)
    theirs._quantized_cdf = torch.from_numpy(cdf)
    theirs._cdf_length = torch.tensor(tables["cdf_length"], dtype=torch.int32)
    theirs._offset = torch.tensor(tables["offset"], dtype=torch.int32)
    with torch.no_grad():
        theirs.quantiles[:, 0, 1] = torch.from_numpy(medians)
    theirs.eval()
    return ours, theirs, medians


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours, theirs, medians = coders()
    rng = np.random.default_rng(0x5EED)
    results = {"cores": os.cpu_count(), "frankensplit": frankensplit.__version__, "batches": {}}
    for batch in (1, 16):
        y = (rng.laplace(scale=1.5, size=(batch, 48, 28, 28)) + medians[None, :, None, None]).astype(np.float32)
        y_torch = torch.from_numpy(y)
        with torch.no_grad():
            reference = theirs.compress(y_torch)
        strings = ours.compress(y)
        assert strings == reference, "strings differ from CompressAI's"
        np.testing.assert_array_equal(ours.decompress(reference, (28, 28)), theirs.decompress(reference, (28, 28)).numpy())
        rounds = []
        for _ in range(args.rounds):
            with torch.no_grad():
                t = {
                    "compressai_compress": median_s(lambda: theirs.compress(y_torch), args.warmup, args.iterations),
                    "ours_compress": median_s(lambda: ours.compress(y), args.warmup, args.iterations),
                    "compressai_decompress": median_s(lambda: theirs.decompress(reference, (28, 28)), args.warmup, args.iterations),
                    "ours_decompress": median_s(lambda: ours.decompress(reference, (28, 28)), args.warmup, args.iterations),
                }
            t["compress_speedup"] = t["compressai_compress"] / t["ours_compress"]
            t["decompress_speedup"] = t["compressai_decompress"] / t["ours_decompress"]
            rounds.append(t)
        results["batches"][batch] = {"bytes_per_latent": sum(map(len, strings)) / batch, "rounds": rounds}
    if args.json:
        print(json.dumps(results))
        return
    print(f"frankensplit {results['frankensplit']}, {results['cores']} cores; median of {args.iterations} calls per round")
    print("| batch | round | CompressAI compress | ours | speed-up | CompressAI decompress | ours | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, r in results["batches"].items():
        for i, t in enumerate(r["rounds"]):
            print(
                f"| {batch} | {i + 1} | {t['compressai_compress'] * 1e3:.3f} ms | {t['ours_compress'] * 1e3:.3f} ms | "
                f"{t['compress_speedup']:.1f}× | {t['compressai_decompress'] * 1e3:.3f} ms | "
                f"{t['ours_decompress'] * 1e3:.3f} ms | {t['decompress_speedup']:.1f}× |"
            )
        for kind in ("compress", "decompress"):
            s = [t[f"{kind}_speedup"] for t in r["rounds"]]
            print(f"batch {batch} {kind}: speed-up median {statistics.median(s):.1f}× (rounds {min(s):.1f}–{max(s):.1f}×), "
                  f"{r['bytes_per_latent']:.0f} bytes per latent")


if __name__ == "__main__":
    main()
