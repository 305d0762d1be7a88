"""Loss curves of one or more runs on one figure (the seed's GPU-vs-Trainium comparison).

    python -m training.plot RUN_DIR [RUN_DIR ...] -o fig.png [--labels a b] [--smooth 10]

Each RUN_DIR is a ``train.py`` output directory (or a metrics.jsonl file). Raw losses are drawn thin, an
exponential moving average (``--smooth`` steps, 0 for none) thick.
"""
from __future__ import annotations

import argparse
import os
import sys

from training.metrics import read_metrics


def ema(values, span: int):
    if span <= 1:
        return list(values)
    a = 2.0 / (span + 1)
    out, m = [], None
    for v in values:
        m = v if m is None else a * v + (1 - a) * m
        out.append(m)
    return out


def plot_runs(runs, out_path: str, labels=None, smooth: int = 10, title: str = "training loss") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, run in enumerate(runs):
        recs = [r for r in read_metrics(run) if "loss" in r and r["loss"] is not None]
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        line, = ax.plot(steps, loss, lw=0.6, alpha=0.35)
        ax.plot(steps, ema(loss, smooth), lw=1.6, color=line.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train.py output directories or metrics.jsonl files")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    p.add_argument("--smooth", type=int, default=10, help="EMA span in steps (0: raw only)")
    p.add_argument("--title", default="training loss")
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        p.error(f"--labels: {len(a.labels)} labels for {len(a.runs)} runs")
    for r in a.runs:
        f = r if not os.path.isdir(r) else os.path.join(r, "metrics.jsonl")
        if not os.path.isfile(f):
            p.error(f"no metrics.jsonl at {f}")
    print(plot_runs(a.runs, a.output, a.labels, a.smooth, a.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
