#!/usr/bin/env python3
"""Rebuild a FrankenSplit bundle with another backbone of the same architecture.

For a teacher trained further with its head frozen (`freeze_head = true`,
configs/scenes/teacher-tail.toml): the head's weights, which the compressor
was distilled against, must be bit for bit those of the bundle, and the
script refuses otherwise. It writes the bundle's compressor (entropy tables
included, so payloads stay byte-identical) and the new backbone as a
reference-named checkpoint, then runs `frankensplit convert` on it with the
bundle's architecture and labels.

    python3 tools/bundles/swap_backbone.py BUNDLE TEACHER.safetensors OUT \
        [--frankensplit target/release/frankensplit]

Needs numpy and safetensors.
"""

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v + '"'
    return repr(v)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("backbone", type=Path, help="the new backbone's weights (timm names, e.g. a run's teacher.safetensors)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--frankensplit", default="target/release/frankensplit")
    args = parser.parse_args()

    manifest = tomllib.loads((args.bundle / "model.toml").read_text())
    arch = manifest["architecture"]
    weights = load_file(str(args.bundle / "weights.safetensors"))
    backbone = load_file(str(args.backbone))
    if any(k.startswith("backbone.") for k in backbone):  # a bundle's weights file
        backbone = {k[len("backbone."):]: v for k, v in backbone.items() if k.startswith("backbone.")}
    head = ("patch_embed.",) + tuple(f"layers.{i}." for i in range(arch["split_stage"]))
    changed = [k for k, v in backbone.items() if k.startswith(head) and not np.array_equal(weights[f"backbone.{k}"], v)]
    if changed:
        sys.exit(f"{args.backbone} has another head than {args.bundle} ({len(changed)} tensors differ, e.g. {changed[0]}): "
                 "the compressor was distilled against the bundle's head")

    checkpoint = {}
    for key, value in weights.items():
        if key.startswith("compressor."):
            checkpoint["compression_module." + key[len("compressor."):]] = value
        elif key.startswith("entropy_tables."):
            checkpoint["compression_module.entropy_bottleneck._" + key[len("entropy_tables."):]] = value
    for key, value in backbone.items():
        checkpoint["backbone." + key] = value

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The manifest's `source` names this file: say what it was made of.
        name = f"{args.bundle.resolve().parent.name}-{args.bundle.name}+{args.backbone.resolve().parent.name}-{args.backbone.stem}"
        checkpoint_path = tmp / f"{name}.safetensors"
        save_file(checkpoint, str(checkpoint_path))
        lines = [f"split_stage = {arch['split_stage']}"]
        for table in ("compressor", "backbone"):
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in arch[table].items()]
        (tmp / "arch.toml").write_text("\n".join(lines) + "\n")
        command = [args.frankensplit, "convert", "--checkpoint", str(checkpoint_path),
                   "--arch", str(tmp / "arch.toml"), "-o", str(args.out)]
        if manifest.get("labels"):
            (tmp / "labels.txt").write_text("\n".join(manifest["labels"]) + "\n")
            command += ["--labels", str(tmp / "labels.txt")]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
