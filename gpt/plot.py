"""Plots, drawn with matplotlib's Agg backend (no display needed): loss curves of a run, several
runs overlaid, and heat maps (attention weights, expert usage).

Runs side by side from the command line (each run folder's log.jsonl; LABEL=PATH names a curve):

    python -m gpt.plot compare.png out/dense moe=out/moe-run
    python -m gpt.plot mod.png out/dense out/mod --x flops --title "MoD vs dense at equal FLOPs"
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    """Records of a run's log.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curves(records, path, title="loss"):
    """Train and val loss against tokens seen, from log.jsonl records, saved to path (PNG)."""
    return compare({"": records}, path, title=title)


def compare(runs, path, title="loss", x="tokens", val_only=False, ylim=None):
    """Overlay several runs: runs = {label: records}. Train loss faint, val loss solid with dots;
    val_only leaves the train curves out (many runs on one plot); ylim = (low, high) zooms in."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        prefix = f"{label} " if label else ""
        train = [] if val_only else [(r[x], r["loss"]) for r in records if r.get("kind") == "train"]
        val = [(r[x], r["val_loss"]) for r in records if r.get("kind") == "eval"]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, lw=1, label=f"{prefix}train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.8, label=f"{prefix}val")
    if ylim:
        ax.set_ylim(*ylim)
    return _finish(fig, ax, path, title, x, "cross-entropy loss (nats/token)")


def lines(series, path, title, xlabel, ylabel, logy=False):
    """Named curves on one plot: series = {label: (xs, ys)} (e.g. per-layer MSE against steps)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    if logy:
        ax.set_yscale("log")
    return _finish(fig, ax, path, title, xlabel, ylabel)


def heatmap(matrix, path, title, xlabel, ylabel, cmap="viridis"):
    """A 2-D array as an image with a colour bar (attention weights, expert counts per layer)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax)
    for axis in (ax.xaxis, ax.yaxis):  # rows and columns are whole things: layers, experts, tokens
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return _finish(fig, ax, path, title, xlabel, ylabel, grid=False, legend=False)


def _finish(fig, ax, path, title, xlabel, ylabel, grid=True, legend=True):
    """Label, save as PNG and close a figure; returns path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Overlay the loss curves of train.py runs on one plot.")
    p.add_argument("png", help="the picture to write")
    p.add_argument("runs", nargs="+", help="run folders or log.jsonl files; LABEL=PATH sets a curve's label")
    p.add_argument("--x", default="tokens", choices=["tokens", "flops", "step", "time"],
                   help="the horizontal axis (flops: training FLOPs, to compare models of unequal cost)")
    p.add_argument("--title", default="loss")
    p.add_argument("--val", action="store_true", help="val loss only (no train curves)")
    p.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="the loss axis' range")
    a = p.parse_args(argv)
    runs = {}
    for spec in a.runs:
        label, _, path = spec.rpartition("=")
        path = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            p.error(f"no log at {path}: give a run folder of train.py (it holds log.jsonl) or the file")
        records = read_log(path)
        if not any(a.x in r for r in records):
            p.error(f"{path} has no {a.x!r} in its records (logs of older runs have no 'flops')")
        runs[label or os.path.basename(os.path.dirname(os.path.abspath(path)))] = records
    print(compare(runs, a.png, title=a.title, x=a.x, val_only=a.val, ylim=a.ylim))


if __name__ == "__main__":
    sys.exit(main())
