"""Cost report of the NKI kernels on the interpreter (instructions per engine, HBM bytes vs minimum).

    python -m bench_kernels [--kernel rmsnorm|rope|swiglu|attention|all] [--shape 7b|13b|70b] [--csv FILE] [--trace]

Shapes are Llama 2's per-rank shapes at TP=8, sequence 4096, micro-batch 1, bf16 (see
bench_kernels/kernel_report.py). Figures come from kernels.sim's trace, not from hardware: instruction
counts and DMA bytes are exact for the kernel as written; no time on trn1 is implied. The wall column is
the interpreter's CPU time. Target: HBM bytes <= 1.1x the minimum for every kernel and direction.
Other benchmarks: python -m bench_kernels.interp (interpreter speed).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile

from bench_kernels.kernel_report import KERNELS, MODELS, SEQ, TP, format_table, measure

TARGET_RATIO = 1.1


def _write_csv(path, rows):
    # Written to a temporary name in the same folder and renamed when complete.
    dicts = [r.as_dict() for r in rows]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bench_kernels.", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dicts[0]) if dicts else ["kernel"])
            w.writeheader()
            w.writerows(dicts)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="all", choices=[*KERNELS, "all"])
    ap.add_argument("--shape", default="7b", choices=list(MODELS), help="Llama 2 size whose per-rank shapes to use")
    ap.add_argument("--csv", metavar="FILE", help="also write the rows to FILE")
    ap.add_argument("--trace", action="store_true", help="print every executed instruction of each kernel")
    args = ap.parse_args(argv)

    names = list(KERNELS) if args.kernel == "all" else [args.kernel]
    print(f"Llama 2 {args.shape}, per-rank shapes at TP={TP}, seq {SEQ}, micro-batch 1, bf16; "
          f"NKI interpreter (kernels.sim) trace")
    rows, failures = [], []
    for name in names:
        try:
            got = measure(name, args.shape, keep_trace=args.trace)
        except Exception as e:       # report every kernel, then fail at the end
            failures.append(f"{name}: {type(e).__name__}: {e}")
            print(f"  {name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        rows += got
        if args.trace:
            for r in got:
                print(f"--- trace {r.kernel} {r.direction} ({len(r.instructions)} instructions)")
                for i, ins in enumerate(r.instructions):
                    print(f"{i:7d} {ins!r} hbm_read={ins.bytes_hbm_read} hbm_written={ins.bytes_hbm_written}")
    if rows:
        print(format_table(rows))
        over = [r for r in rows if r.ratio > TARGET_RATIO]
        print(f"minimum bytes = each launcher input read once + each output written once; target ratio <= "
              f"{TARGET_RATIO}: " + ("met by every row" if not over else
                                     "MISSED by " + ", ".join(f"{r.kernel} {r.direction} ({r.ratio:.3f})"
                                                              for r in over)))
    if args.csv:
        _write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    if failures:
        print("failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
