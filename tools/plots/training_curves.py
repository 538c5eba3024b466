#!/usr/bin/env python3
"""Training curves from the metrics.jsonl of `frankensplit train` runs.

    python3 tools/plots/training_curves.py -o docs/img/teacher.png runs/scenes/teacher
    python3 tools/plots/training_curves.py -o docs/img/compressors.png runs/scenes/compressor-l*

A teacher run gets its training loss and validation top-1 against images
seen; compressor runs get validation distortion, estimated bpp and top-1,
one line per run, with the stage boundary marked. Needs matplotlib.
"""
import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(run):
    lines = []
    for line in (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            lines.append(json.loads(line))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    parser.add_argument("-o", "--output", required=True, help="PNG or SVG to write")
    args = parser.parse_args()
    runs = {pathlib.Path(r).name: read(r) for r in args.runs}
    teacher = all(m["kind"] == "teacher" for lines in runs.values() for m in lines)
    panels = (
        [("loss", "train", "training loss"), ("top1", "val", "validation top-1 (%)")]
        if teacher
        else [
            ("distortion", "val", "validation distortion per image"),
            ("bpp", "val", "validation bpp (estimated)"),
            ("top1", "val", "validation top-1 (%)"),
        ]
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (key, split, label) in zip(axes, panels):
        for name, lines in runs.items():
            points = [(m["global_step"], m[key]) for m in lines if m["split"] == split and m.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if split == "val" else None, markersize=3, label=name)
            stages = sorted({m["stage"] for m in lines})
            for stage in stages[1:]:
                step = max(m["global_step"] for m in lines if m["stage"] < stage)
                ax.axvline(step, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        if key in ("distortion", "bpp"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
