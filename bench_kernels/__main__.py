"""Kernel report: estimated trn1 time of every NKI kernel vs its roofline, at Llama 2's per-rank shapes.

    python -m bench_kernels [--kernel K[,K]] [--shape 7b|13b|70b[,..]] [--direction fwd|bwd] [--seq N]
                            [--out DIR] [--csv FILE] [--chart FILE] [--baseline CSV] [--trace]
                            [--trace-window A:B] [--measure]

Each kernel (rmsnorm, rope, swiglu, attention; forward and backward) runs once on the NKI interpreter
(kernels.sim) at the per-rank shapes of Llama 2 7B/13B/70B (TP=8, sequence 4096, micro-batch 1, bf16; see
bench_kernels/kernel_report.py); the trace is turned into an estimated time on one NeuronCore-v2 by
kernels.sim.cost (documented per-instruction formulas, DMA queues and HBM bandwidth; an estimate, not a
measurement). Columns: estimated us, roofline floor us (max(useful FLOPs / TensorE bf16 peak, minimum bytes /
HBM bandwidth); causal attention counts only unmasked FLOPs), % of roofline (floor / estimate), bound engine,
busy % per engine (of the estimated time; dma = mean of the 16 DMA queues), HBM bytes / minimum bytes,
instructions, interpreter wall seconds (CPU time of this machine, not a kernel time).

Writes DIR/kernels.csv (or --csv), DIR/roofline.png (or --chart) and DIR/kernels.md (the table in Markdown),
DIR = --out (default out/bench_kernels).
--trace (one selected kernel direction and shape): DIR/trace_<kernel>_<dir>_<model>.png, an engine timeline
(Gantt), and .json, the same timeline as a Chrome trace (chrome://tracing, https://ui.perfetto.dev).
--baseline CSV (an earlier run's): adds its estimate ("before us") and the speedup per row of the same shape.
--measure: on a Neuron host with the real nki, also time each kernel on the device (bench_kernels.device;
untested here) and print it beside the estimate; refused where there is no device.
Other benchmarks: python -m bench_kernels.estimate (any kernel file), python -m bench_kernels.interp.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench_kernels.kernel_report import (CSV_COLUMNS, KERNELS, MODELS, SEQ, TP, format_markdown, format_table,
                                         measure_one, read_baseline, select, target_pct)

PROG = "python -m bench_kernels"
DEFAULT_OUT = os.path.join("out", "bench_kernels")


class UsageError(Exception):
    """Bad command line: printed as one line, exit status 2."""


def _names(values):
    """--kernel a,b --kernel c -> ["a", "b", "c"]; None when not given or "all"."""
    if not values:
        return None
    out = [v.strip() for group in values for v in group.split(",") if v.strip()]
    return None if out == ["all"] else out


def _window(text):
    if text is None:
        return None
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--trace-window {text!r}: expected START:END in microseconds, e.g. 100:150") from None
    if not 0 <= a < b:
        raise UsageError(f"--trace-window {text!r}: need 0 <= START < END")
    return a, b


def _parser():
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", metavar="K[,K]", help=f"kernels ({', '.join(KERNELS)}; default all)")
    ap.add_argument("--shape", action="append", metavar="M[,M]",
                    help=f"Llama 2 sizes whose per-rank shapes to use ({', '.join(MODELS)}; default all)")
    ap.add_argument("--direction", action="append", metavar="D", help="fwd, bwd (default both)")
    ap.add_argument("--seq", type=int, default=SEQ, help=f"sequence length (default {SEQ}; smaller for a quick look)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--csv", metavar="FILE", help="CSV file (default OUT/kernels.csv)")
    ap.add_argument("--chart", metavar="FILE", help="percent-of-roofline PNG (default OUT/roofline.png)")
    ap.add_argument("--baseline", metavar="CSV", help="an earlier run's CSV: show its estimate ('before') and the "
                                                      "speedup of each row with the same kernel, direction and shape")
    ap.add_argument("--trace", action="store_true", help="write the engine timeline (Gantt PNG + Chrome trace JSON) "
                                                         "of the one selected kernel direction and shape")
    ap.add_argument("--trace-window", metavar="A:B", help="microseconds shown in the timeline's zoomed panel")
    ap.add_argument("--measure", action="store_true", help="also measure on a Neuron device (real nki only)")
    ap.add_argument("--warmup", type=int, default=5, help="--measure: untimed calls first")
    ap.add_argument("--iters", type=int, default=20, help="--measure: timed calls (median reported)")
    ap.add_argument("--profile-dir", metavar="DIR", help="--measure: also capture Neuron device profiles (NEFF + NTFF "
                                                         "for Neuron Explorer) into DIR")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _check_backend(measure):
    """The estimate runs the kernels on the interpreter in this process (kernels.nki_compat imported with
    LLAMA_KERNELS_NKI=sim, the environment restored after); --measure needs a device and times it in a child."""
    if "kernels.nki_compat" not in sys.modules:
        old = os.environ.get("LLAMA_KERNELS_NKI")
        os.environ["LLAMA_KERNELS_NKI"] = "sim"
        try:
            import kernels.nki_compat  # noqa: F401
        finally:
            if old is None:
                del os.environ["LLAMA_KERNELS_NKI"]
            else:
                os.environ["LLAMA_KERNELS_NKI"] = old
    backend = sys.modules["kernels.nki_compat"].BACKEND
    if backend != "sim":
        raise UsageError(f"kernels are imported with the real nki (BACKEND={backend!r}); the estimate runs them on "
                         "the interpreter: run with LLAMA_KERNELS_NKI=sim (--measure times the device in a child)")
    if measure:
        from bench_kernels import device
        ok, why = device.available()
        if not ok:
            raise UsageError(f"--measure: no Neuron device to measure on ({why}); the estimates need no device: "
                             "run without --measure")


def run(args):
    try:
        jobs = select(_names(args.kernel), _names(args.shape), _names(args.direction))
    except ValueError as e:          # unknown kernel / shape / direction
        raise UsageError(str(e)) from None
    if args.seq < 1:
        raise UsageError(f"--seq {args.seq}: must be >= 1")
    window = _window(args.trace_window)
    try:
        baseline = read_baseline(args.baseline) if args.baseline else {}
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.trace and len(jobs) != 1:
        raise UsageError(f"--trace writes one kernel's timeline but {len(jobs)} are selected: choose one with "
                         "--kernel, --direction and --shape")
    _check_backend(args.measure)
    from tqdm import tqdm

    print(f"per-rank shapes of Llama 2 at TP={TP}, seq {args.seq}, micro-batch 1, bf16; times estimated for one "
          f"NeuronCore-v2 (trn1) by kernels.sim.cost from the interpreter's trace (documented formulas, not measured)")
    rows, failures = [], []
    t_start = time.perf_counter()
    bar = tqdm(jobs, desc="kernels", unit="kernel", disable=args.no_progress, file=sys.stderr)
    for kernel, direction, model in bar:
        bar.set_postfix_str(f"{kernel} {direction} {model}")
        try:
            row = measure_one(kernel, direction, model, seq=args.seq, keep_report=args.trace)
            shape, before = baseline.get((kernel, direction, model), (None, None))
            if shape == row.shape:                     # same kernel at the same shape (and sequence)
                row.baseline_us = before
            if args.measure:
                from bench_kernels import device
                row.measured_us = device.measure(kernel, direction, model, args.seq, args.warmup, args.iters,
                                                 args.profile_dir)
        except Exception as e:       # report every kernel, then fail at the end
            failures.append(f"{kernel} {direction} {model}: {type(e).__name__}: {e}")
            tqdm.write(f"  {kernel} {direction} {model}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        rows.append(row)
    bar.close()
    if rows:
        _report(args, rows, window)
    print(f"wall time {time.perf_counter() - t_start:.1f} s for {len(rows)} kernel runs")
    if failures:
        print("failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def _report(args, rows, window):
    from bench_kernels import charts

    print(format_table(rows))
    print("est = estimated time; floor = roofline max(useful FLOPs / 91.75 TFLOPS, minimum bytes / 410 GB/s); "
          "% roof = floor / est; busy % of est; HBM/min = bytes moved / (inputs read once + outputs written once)"
          + ("; measured = device wall per call incl. launch overhead (bench_kernels.device)" if args.measure else ""))
    missed = [r for r in rows if r.pct_roofline < target_pct(r.kernel, r.direction)]
    print("targets (% of roofline: attention fwd 70, bwd 50, others 75): " +
          ("met by every row" if not missed else f"missed by {len(missed)} of {len(rows)}: " +
           ", ".join(f"{r.kernel} {r.direction} {r.model} ({r.pct_roofline:.0f} < "
                     f"{target_pct(r.kernel, r.direction):.0f})" for r in missed)))
    bad = [r for r in rows if r.impossible]
    if bad:
        print("IMPOSSIBLE (estimate below the roofline floor: a bug in the cost model or the minimum counts): "
              + ", ".join(f"{r.kernel} {r.direction} {r.model}" for r in bad), file=sys.stderr)
    csv_path = args.csv or os.path.join(args.out, "kernels.csv")
    charts.write_csv(csv_path, [r.as_dict() for r in rows], CSV_COLUMNS)
    chart_path = args.chart or os.path.join(args.out, "roofline.png")
    charts.roofline_chart(chart_path, rows)
    md_path = os.path.join(args.out, "kernels.md")
    charts.write_text(md_path, format_markdown(rows) + "\n")
    print(f"wrote {csv_path}, {chart_path}, {md_path}")
    if args.trace:
        r = rows[0]
        prefix = os.path.join(args.out, f"trace_{r.kernel}_{r.direction}_{r.model}")
        title = f"{r.kernel} {r.direction}, Llama 2 {r.model} per-rank {r.shape} {r.dtype}"
        png, js = charts.write_timeline(prefix, r.report, title, window, r.labels)
        print(r.report.summary())
        print(f"wrote {png} (engine timeline), {js} (Chrome trace: chrome://tracing or https://ui.perfetto.dev)")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
