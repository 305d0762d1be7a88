"""Files of the kernel report: CSV rows, the percent-of-roofline bar chart, an engine timeline (Gantt PNG) and
its Chrome trace (JSON for chrome://tracing or https://ui.perfetto.dev). Every file is written to a temporary
name in its folder and renamed when complete, so a reader never sees half a file.

Figures are estimates of ``kernels.sim.cost`` (documented per-instruction formulas of NeuronCore-v2), not
measurements; every chart says so in its title.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile

from bench_kernels.kernel_report import target_pct

MODEL_NOTE = "kernels.sim.cost estimate (documented formulas, not a device measurement)"
# Queue order of the timeline rows: compute engines first, then the 16 DMA queues.
_COMPUTE = ("tensor", "vector", "scalar", "gpsimd", "sync")


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path in ``path``'s folder; renamed to ``path`` when the block completes, removed if it
    raises."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)       # mkstemp makes 0600; the file should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_csv(path, dicts, columns):
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns))
            w.writeheader()
            w.writerows(dicts)


def write_text(path, text):
    with atomic_path(path, ".txt") as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, obj):
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def roofline_chart(path, rows):
    """Horizontal bars: percent of roofline (floor / estimate) per kernel, direction and model; the bound engine
    is written next to each bar."""
    plt = _pyplot()
    labels = [f"{r.kernel} {r.direction} {r.model}" for r in rows]
    pct = [r.pct_roofline for r in rows]
    models = sorted({r.model for r in rows}, key=lambda m: float(m.rstrip("b")) if m.rstrip("b").isdigit() else 0)
    colours = dict(zip(models, ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, pct, color=[colours.get(r.model, "#888888") for r in rows])
    for yi, r in zip(y, rows):
        ax.text(min(r.pct_roofline, 100) + 1, yi, f"{r.pct_roofline:.0f}% ({r.bound})", va="center", fontsize=8,
                zorder=4, bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8))
    ax.scatter([target_pct(r.kernel, r.direction) for r in rows], y, marker="|", s=160, color="black", zorder=3,
               label="target")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, 125)
    ax.axvline(100, color="black", lw=0.8)
    ax.set_xlabel("percent of roofline = roofline floor / estimated time (%)")
    ax.set_title(f"NKI kernels on trn1, per-rank Llama 2 shapes (TP=8)\n{MODEL_NOTE}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in models]
    handles.append(plt.Line2D([], [], marker="|", ls="", ms=12, color="black"))
    ax.legend(handles, [f"Llama 2 {m}" for m in models] + ["issue-11 target"], fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _queues(timeline):
    used = {e.queue for e in timeline}
    dma = sorted((q for q in used if q.startswith("dma")), key=lambda q: int(q[3:]))
    return [q for q in _COMPUTE if q in used] + dma


def dma_labels(instructions):
    """{index: "<op> load" | "<op> store" | "<op> on-chip" | "<op> HBM"} for the DMAs of a trace: the Gantt chart
    colours loads (HBM -> on-chip), stores (on-chip -> HBM), on-chip copies and HBM-to-HBM copies apart, which is
    what a software pipeline is read by."""
    hbm = ("hbm", "private_hbm", "shared_hbm")
    out = {}
    for i, ins in enumerate(instructions):
        if ins.engine != "dma":
            continue
        bufs = {o.role: o.buffer for o in ins.operands}
        src_hbm, dst_hbm = bufs.get("src") in hbm, bufs.get("dst") in hbm
        kind = {(True, False): "load", (False, True): "store", (False, False): "on-chip"}.get((src_hbm, dst_hbm), "HBM")
        out[i] = f"{ins.op} {kind}"
    return out


def _op(e, labels):
    return labels.get(e.index, e.op) if labels else e.op


def _draw_timeline(ax, timeline, queues, colours, t0, t1, labels=None):
    rows = {q: i for i, q in enumerate(queues)}
    bars = {}
    for e in timeline:
        if e.end_us < t0 or e.start_us > t1:
            continue
        bars.setdefault((e.queue, _op(e, labels)), []).append((e.start_us, max(e.end_us - e.start_us, 1e-4)))
    for (q, op), spans in bars.items():
        y = len(queues) - 1 - rows[q]
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=colours[op], edgecolor="none")
    ax.set_yticks(range(len(queues)), queues[::-1], fontsize=7)
    ax.set_ylim(-0.6, len(queues) - 0.4)
    ax.set_xlim(t0, t1)
    ax.set_xlabel("time (us)")
    ax.grid(axis="x", lw=0.3)


def _colour(plt, i):
    """Distinct colours: tab10 first (alphabetically adjacent ops such as nc_matmul/nc_transpose would get the
    paired shades of tab20), then the dark and light halves of tab20b."""
    if i < 10:
        return plt.get_cmap("tab10")(i)
    return plt.get_cmap("tab20b")(((i - 10) * 3) % 20)


def gantt_chart(path, report, title, window=None, labels=None):
    """Engine timeline of one CostReport: one row per queue (compute engines, then DMA queues), bars coloured by
    instruction op, time in microseconds. Top panel: the whole kernel; bottom panel: ``window`` = (start_us,
    end_us), by default a twentieth of the kernel around its middle, where the steady state shows. ``labels``
    ({instruction index: legend label}, e.g. ``dma_labels(trace.instructions)``) refines the colouring."""
    plt = _pyplot()
    tl = report.timeline
    queues = _queues(tl)
    ops = sorted({_op(e, labels) for e in tl})
    colours = {op: _colour(plt, i) for i, op in enumerate(ops)}
    total = report.total_us
    if window is None:
        w = max(total / 20, min(total, 5.0))
        window = (max(0.0, total / 2 - w / 2), min(total, total / 2 + w / 2))
    fig, axes = plt.subplots(2, 1, figsize=(13, 2 * (0.22 * len(queues) + 1.2) + 1.0))
    _draw_timeline(axes[0], tl, queues, colours, 0.0, total, labels)
    axes[0].axvspan(*window, color="black", alpha=0.08)
    axes[0].set_title(f"whole kernel: {total:.1f} us, bound: {report.bound} (shaded: the window below)", fontsize=9)
    _draw_timeline(axes[1], tl, queues, colours, *window, labels)
    axes[1].set_title(f"window {window[0]:.1f}-{window[1]:.1f} us", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[op]) for op in ops]
    fig.legend(handles, ops, loc="upper right", fontsize=8, ncol=1, title="op", title_fontsize=8)
    fig.suptitle(f"{title}\n{MODEL_NOTE}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_timeline(prefix, report, title, window=None, labels=None):
    """``prefix``.png (Gantt) and ``prefix``.json (Chrome trace) of one CostReport; returns both paths."""
    png, js = prefix + ".png", prefix + ".json"
    gantt_chart(png, report, title, window, labels)
    trace = report.chrome_trace()
    for ev in trace["traceEvents"]:                   # loads / stores apart, as in the PNG
        if ev["ph"] == "X" and labels and ev["args"]["index"] in labels:
            ev["name"] = labels[ev["args"]["index"]] + ev["name"][len(report.ops[ev["args"]["index"]]):]
    trace.setdefault("otherData", {})["title"] = title
    write_json(js, trace)
    return png, js
