"""Throughput of the NKI interpreter (kernels.sim) on CPU: instructions per second, per kernel and direction.

    python -m bench_kernels.interp [--repeats R] [--only NAME] [--micro] [--baseline CHECKOUT [--rounds N]]

Kernels: our four kernels (kernels/rmsnorm.py, rope.py, swiglu.py, attention.py), forward and backward, through
their torch-level launchers on CPU tensors, at Llama 2 7B per-rank shapes with TP=8, sequence 1024, bf16:
rmsnorm x[1024,4096]; rope q,k[1,4,1024,128]; swiglu gate,up[1024,1376]; attention q,k,v[1,1,1024,128] causal
(one head: the instruction count grows linearly with heads). The attention backward takes o and lse from the
kernel's own forward. Each case runs once to warm up, then R times while kernels.sim.trace records; the figure is
instructions / wall seconds of the best run (least disturbed by other processes on the machine). The trace is
on, as in the test suite's trace-based checks; it costs a few microseconds per instruction.

--micro adds two synthetic cases: an instruction-bound loop on [128,128] fp32 tiles (tensor_tensor, activation,
tensor_scalar, tensor_copy) and a tiled bf16 matmul [512,512]^2 accumulated in PSUM.

--baseline CHECKOUT compares against another checkout of this repository (e.g. an older commit): each round runs
this file's cases in one subprocess per checkout (PYTHONPATH set to it, OMP_NUM_THREADS=1), alternating, and the
table gives each side's best over the rounds and their ratio. Alternating within one run keeps the ratio
meaningful on a shared, noisy machine; absolute figures are not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

P = 128
SEQ = 1024
HIDDEN, HEADS_PER_RANK, FFN_PER_RANK, HEAD_DIM = 4096, 32 // 8, 11008 // 8, 128


# --------------------------------------------------------------------------- kernel cases

def _randn(torch, *shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def _rope_tables(torch):
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    ang = torch.arange(SEQ, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((ang, ang), -1).expand(1, SEQ, HEAD_DIM)
    return emb.cos().to(torch.bfloat16).contiguous(), emb.sin().to(torch.bfloat16).contiguous()


def kernel_cases():
    """[(kernel, direction, shape text, zero-argument launcher call)] for the four kernels."""
    import torch
    from kernels import attention, rmsnorm, rope, swiglu

    x = _randn(torch, SEQ, HIDDEN, seed=1)
    w = _randn(torch, HIDDEN, seed=2)
    dy = _randn(torch, SEQ, HIDDEN, seed=3)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5)
    q4 = _randn(torch, 1, HEADS_PER_RANK, SEQ, HEAD_DIM, seed=4)
    k4 = _randn(torch, 1, HEADS_PER_RANK, SEQ, HEAD_DIM, seed=5)
    cos, sin = _rope_tables(torch)
    gate = _randn(torch, SEQ, FFN_PER_RANK, seed=6, scale=3.0)
    up = _randn(torch, SEQ, FFN_PER_RANK, seed=7)
    dout = _randn(torch, SEQ, FFN_PER_RANK, seed=8)
    q, k, v = (_randn(torch, 1, 1, SEQ, HEAD_DIM, seed=s) for s in (10, 11, 12))
    do = _randn(torch, 1, 1, SEQ, HEAD_DIM, seed=13)
    o, lse = attention.flash_attention_fwd(q, k, v, causal=True)
    rms = f"x[{SEQ},{HIDDEN}]"
    rp = f"q,k[1,{HEADS_PER_RANK},{SEQ},{HEAD_DIM}]"
    sw = f"gate,up[{SEQ},{FFN_PER_RANK}]"
    at = f"q,k,v[1,1,{SEQ},{HEAD_DIM}] causal"
    return [
        ("rmsnorm", "fwd", rms, lambda: rmsnorm.rms_norm_fwd(x, w, 1e-5)),
        ("rmsnorm", "bwd", rms, lambda: rmsnorm.rms_norm_bwd(dy, x, w, rstd)),
        ("rope", "fwd", rp, lambda: rope.rope_fwd(q4, k4, cos, sin)),
        ("rope", "bwd", rp, lambda: rope.rope_bwd(q4, k4, cos, sin)),
        ("swiglu", "fwd", sw, lambda: swiglu.swiglu_fwd(gate, up)),
        ("swiglu", "bwd", sw, lambda: swiglu.swiglu_bwd(dout, gate, up)),
        ("attention", "fwd", at, lambda: attention.flash_attention_fwd(q, k, v, causal=True)),
        ("attention", "bwd", at, lambda: attention.flash_attention_bwd(q, k, v, o, do, lse, causal=True)),
    ]


# --------------------------------------------------------------------------- synthetic cases (--micro)

def make_loop_kernel(iters):
    from kernels.sim import nisa, nki, nl

    @nki.jit
    def loop_kernel(a, b):
        out = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.shared_hbm)
        x = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
        y = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
        t = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=x, src=a)
        nisa.dma_copy(dst=y, src=b)
        for _ in range(iters):
            nisa.tensor_tensor(dst=t, data1=x, data2=y, op=nl.multiply)
            nisa.activation(dst=t, op=nl.tanh, data=t)
            nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=0.5, op1=nl.add, operand1=0.25)
            nisa.tensor_copy(dst=x, src=t)
        nisa.dma_copy(dst=out, src=x)
        return out
    return loop_kernel


def make_matmul_kernel():
    from kernels.sim import nisa, nki, nl

    @nki.jit
    def matmul_kernel(a, b):
        m, kdim = a.shape
        n = b.shape[1]
        out = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.shared_hbm)
        for m0 in range(0, m, P):
            a_t = []
            for k0 in range(0, kdim, P):
                at = nl.ndarray((P, P), dtype=a.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=at, src=a[m0:m0 + P, k0:k0 + P])
                tp = nl.ndarray((P, P), dtype=a.dtype, buffer=nl.psum)
                nisa.nc_transpose(dst=tp, data=at)
                att = nl.ndarray((P, P), dtype=a.dtype, buffer=nl.sbuf)
                nisa.tensor_copy(dst=att, src=tp)
                a_t.append(att)
            for n0 in range(0, n, 512):
                nr = min(512, n - n0)
                acc = nl.ndarray((P, 512), dtype=nl.float32, buffer=nl.psum)
                for ki, k0 in enumerate(range(0, kdim, P)):
                    bt = nl.ndarray((P, 512), dtype=b.dtype, buffer=nl.sbuf)
                    nisa.dma_copy(dst=bt[:, 0:nr], src=b[k0:k0 + P, n0:n0 + nr])
                    nisa.nc_matmul(dst=acc[:, 0:nr], stationary=a_t[ki], moving=bt[:, 0:nr])
                res = nl.ndarray((P, 512), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_copy(dst=res[:, 0:nr], src=acc[:, 0:nr])
                nisa.dma_copy(dst=out[m0:m0 + P, n0:n0 + nr], src=res[:, 0:nr])
        return out
    return matmul_kernel


def micro_cases(loop_iters=2500, matmul_size=512):
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (P, P)).astype(np.float32)
    b = rng.uniform(-1, 1, (P, P)).astype(np.float32)
    ma = rng.uniform(-1, 1, (matmul_size, matmul_size)).astype(ml_dtypes.bfloat16)
    mb = rng.uniform(-1, 1, (matmul_size, matmul_size)).astype(ml_dtypes.bfloat16)
    loop, mm = make_loop_kernel(loop_iters), make_matmul_kernel()
    return [
        ("loop", "-", f"{loop_iters} x 4 instr on [128,128] fp32", lambda: loop(a, b)),
        ("matmul", "-", f"[{matmul_size},{matmul_size}]^2 bf16->fp32", lambda: mm(ma, mb)),
    ]


# --------------------------------------------------------------------------- measurement

def measure(fn, repeats):
    """(instructions, best wall seconds) of ``fn`` over ``repeats`` recorded runs after one warm-up run."""
    from kernels.sim import trace
    fn()
    best = None
    n = 0
    for _ in range(repeats):
        with trace.record() as tr:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        n = len(tr.instructions)
        best = wall if best is None else min(best, wall)
    return n, best


def run_cases(repeats, only=None, micro=False):
    """One dict per case: kernel, direction, shape, instructions, wall_s, per_s."""
    cases = kernel_cases() + (micro_cases() if micro else [])
    rows = []
    for kernel, direction, shape, fn in cases:
        if only and kernel not in only:
            continue
        n, wall = measure(fn, repeats)
        rows.append(dict(kernel=kernel, direction=direction, shape=shape, instructions=n, wall_s=wall,
                         per_s=n / wall))
    return rows


def _worker(checkout, args):
    """Run this file's cases in a subprocess that imports ``kernels`` from ``checkout``; returns its rows."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats)]
    if args.only:
        cmd += ["--only", ",".join(args.only)]
    if args.micro:
        cmd.append("--micro")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker for {checkout} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    want = os.path.join(os.path.abspath(checkout), "kernels")
    if not result["kernels"].startswith(want):
        raise SystemExit(f"worker for {checkout} imported kernels from {result['kernels']}, not {want}")
    return result["rows"]


def _best(acc, rows):
    for r in rows:
        key = (r["kernel"], r["direction"])
        if key not in acc or r["per_s"] > acc[key]["per_s"]:
            acc[key] = r


def compare(args):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base, cur = {}, {}
    for _ in range(args.rounds):
        _best(base, _worker(args.baseline, args))
        _best(cur, _worker(here, args))
    print(f"instructions/s, best of {args.rounds} alternating rounds x {args.repeats} runs, OMP_NUM_THREADS=1; "
          f"baseline {os.path.abspath(args.baseline)}, current {here}")
    print(f"{'kernel':10s} {'dir':4s} {'shape':34s} {'instr':>6s} {'base/s':>9s} {'now/s':>9s} {'speed-up':>8s}")
    for key, c in cur.items():
        b = base.get(key)
        bs = f"{b['per_s']:9,.0f}" if b else f"{'-':>9s}"
        ratio = f"{(c['per_s'] / b['per_s']):7.2f}x" if b else f"{'-':>8s}"
        note = "" if not b or b["instructions"] == c["instructions"] else f"  (base: {b['instructions']} instr)"
        print(f"{c['kernel']:10s} {c['direction']:4s} {c['shape']:34s} {c['instructions']:6d} {bs} "
              f"{c['per_s']:9,.0f} {ratio}{note}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="recorded runs per case (best is reported)")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None,
                    help="comma-separated kernels (rmsnorm,rope,swiglu,attention,loop,matmul)")
    ap.add_argument("--micro", action="store_true", help="add the synthetic loop and matmul cases")
    ap.add_argument("--baseline", metavar="CHECKOUT", help="compare with the kernels of another checkout")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --baseline")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline:
        compare(args)
        return
    rows = run_cases(args.repeats, args.only, args.micro)
    if args.worker:
        import kernels
        print(json.dumps(dict(kernels=os.path.dirname(os.path.abspath(kernels.__file__)), rows=rows)))
        return
    print(f"instructions/s of kernels.sim (trace on), best of {args.repeats} runs after a warm-up")
    print(f"{'kernel':10s} {'dir':4s} {'shape':34s} {'instr':>6s} {'wall s':>8s} {'instr/s':>9s}")
    for r in rows:
        print(f"{r['kernel']:10s} {r['direction']:4s} {r['shape']:34s} {r['instructions']:6d} {r['wall_s']:8.3f} "
              f"{r['per_s']:9,.0f}")


if __name__ == "__main__":
    main()
