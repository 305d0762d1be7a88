"""The native CPU extension (kernels/native) against the PyTorch paths it replaces.

    python -m bench_kernels.native [--threads 2] [--params 100e6] [--rounds 3] [--sections build adamw kernels train]

Sections (all on --threads threads; every timed variant runs in its own process, so that peak memory is its own):
  build     a build of the extension into an empty cache directory (CMake configure + compile + link), seconds
  adamw     one optimizer step over --params bf16 parameters (12 tensors of equal size, bf16 gradients, fp32
            moments): the fused native AdamW-SR against the PyTorch composite "fp32 AdamW math, then an SR cast"
            (torchao-style: torch.randint bits) and against SRAdamW's PyTorch path (the same counter bits as the
            native kernel). Time: median of --steps steps after one warm-up step. Peak memory: the process's peak
            RSS over all steps (VmHWM, reset through /proc/self/clear_refs once the state is allocated) minus
            its RSS then, i.e. the memory the steps need beyond parameters, gradients and moments.
  kernels   RMSNorm and SwiGLU forward + backward (autograd, bf16) at the tiny config's shapes (1024 x 64 and
            1024 x 176) and at hidden 4096 (2048 x 4096 and 2048 x 11008): kernels.native against the reference
            composite (what the ``reference`` backend of kernels.ops runs). Median of 30 (tiny) / 5 calls per
            round, best round.
  train     ``python train.py`` (the default run: tiny, bf16-sr, 250 steps) with --native auto and --native off:
            median logged tokens/s after the first 10 steps (the ratio), and the process's wall time (which also
            holds start-up: imports, data, the matmul probe).
A benchmark, not a test: figures depend on the machine and its load (run it alone: flock /tmp/heavy.lock ...).
Targets: AdamW-SR >= 3x the torchao-style composite with lower peak memory; RMSNorm / SwiGLU >= 1.5x the
reference; train.py faster with the native kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("build", "adamw", "kernels", "train")
HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:   # "5": reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")


# --------------------------------------------------------------------------- adamw (child process)

def _composite_step(params, grads, ms, vs, t, counter_bits):
    """fp32 AdamW math then an SR cast, per tensor (SRAdamW's PyTorch ops)."""
    from training.precision import sr_tensor_key, stochastic_round_bf16
    lr, b1, b2, eps, wd = HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], HP["weight_decay"]
    gen = None if counter_bits else torch.Generator().manual_seed(t)
    for i, (p, gr, m, v) in enumerate(zip(params, grads, ms, vs)):
        g = gr.float()
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p32 = p.float()
        p32.mul_(1 - lr * wd)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
        p32.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        key = sr_tensor_key(0, t, 0, i)
        p.copy_(stochastic_round_bf16(p32, key=key) if counter_bits else stochastic_round_bf16(p32, gen))


def _native_step(params, grads, ms, vs, t):
    from training.precision import sr_tensor_key
    op = torch.ops.llama_kernels.native_adamw_sr_
    lr, b1, b2, eps, wd = HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], HP["weight_decay"]
    for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
        op(p, g, m, v, lr, b1, b2, eps, wd, 1 - b1 ** t, 1 - b2 ** t, sr_tensor_key(0, t, 0, i))


def adamw_child(variant: str, n_params: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    if variant == "native":
        import kernels.native as native
        if not native.available():
            raise SystemExit(f"native unavailable: {native.unavailable_reason()}")
    n_tensors = 12
    per = n_params // n_tensors
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(per, generator=gen).to(torch.bfloat16) for _ in range(n_tensors)]
    grads = [(torch.randn(per, generator=gen) * 1e-2).to(torch.bfloat16) for _ in range(n_tensors)]
    ms = [torch.zeros(per) for _ in range(n_tensors)]
    vs = [torch.zeros(per) for _ in range(n_tensors)]

    def step(t):
        if variant == "native":
            _native_step(params, grads, ms, vs, t)
        else:
            _composite_step(params, grads, ms, vs, t, counter_bits=variant == "sradamw-pytorch")

    rss0 = _rss_kib("VmRSS")                             # parameters, gradients and (touched) moments
    _reset_peak_rss()
    step(1)                                              # warm-up (thread pool, allocator), in the peak
    times = []
    for t in range(2, 2 + steps):
        t0 = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - t0)
    peak_extra = max(0, _rss_kib("VmHWM") - rss0)
    return dict(variant=variant, params=per * n_tensors, step_s=statistics.median(times), times=times,
                state_mib=rss0 / 1024, peak_extra_mib=peak_extra / 1024)


def _child(args_list) -> dict:
    cmd = [sys.executable, "-m", "bench_kernels.native", "--child", *map(str, args_list)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_adamw(n_params: int, steps: int, threads: int):
    print(f"\n== AdamW-SR step, {n_params / 1e6:.0f}M bf16 params in 12 tensors, bf16 grads, fp32 moments, "
          f"{threads} threads (median of {steps} steps; peak = VmHWM above the allocated state)")
    rows = {v: _child(["adamw", v, n_params, steps, threads])
            for v in ("native", "torchao-composite", "sradamw-pytorch")}
    base = rows["native"]
    for v, r in rows.items():
        print(f"  {v:<20} {r['step_s'] * 1e3:9.1f} ms/step  {r['step_s'] / base['step_s']:6.2f}x native's time  "
              f"peak extra {r['peak_extra_mib']:8.1f} MiB  (state {r['state_mib']:.0f} MiB)")
    speedup = rows["torchao-composite"]["step_s"] / base["step_s"]
    print(f"  native speed-up vs the torchao-style composite: {speedup:.2f}x (target >= 3x); "
          f"peak extra memory {base['peak_extra_mib']:.1f} vs {rows['torchao-composite']['peak_extra_mib']:.1f} MiB")
    return rows


# --------------------------------------------------------------------------- kernels

def _time_fwd_bwd(fn, inputs, dy, calls):
    times = []
    for _ in range(calls):
        xs = [t.detach().requires_grad_() for t in inputs]
        t0 = time.perf_counter()
        fn(*xs).backward(dy)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_kernels(threads: int, rounds: int):
    import kernels.native as native
    from kernels import ops
    from kernels import reference as ref
    torch.set_num_threads(threads)
    if not native.available():
        print(f"\n== kernels: native unavailable ({native.unavailable_reason()})")
        return {}
    bf = torch.bfloat16
    cases = [("rmsnorm tiny", (1024, 64)), ("swiglu tiny", (1024, 176)),
             ("rmsnorm h4096", (2048, 4096)), ("swiglu h4096", (2048, 11008))]
    print(f"\n== RMSNorm / SwiGLU forward + backward (autograd), bf16, {threads} threads (median per round, best "
          f"of {rounds} rounds)")
    out = {}
    for name, shape in cases:
        gen = torch.Generator().manual_seed(1)
        a, b = torch.randn(shape, generator=gen).to(bf), torch.randn(shape, generator=gen).to(bf)
        dy = torch.randn(shape, generator=gen).to(bf)
        calls = 30 if shape[-1] < 1000 else 5
        if name.startswith("rmsnorm"):
            w = torch.randn(shape[-1], generator=gen).to(bf)
            paths = dict(reference=(lambda x, w: ops._RMSNormReference.apply(x, w, 1e-5), [a, w]),
                         native=(lambda x, w: native.rms_norm(x, w, 1e-5), [a, w]))
        else:
            paths = dict(reference=(ref.swiglu_ref, [a, b]), native=(native.swiglu, [a, b]))
        best = {k: float("inf") for k in paths}
        for _ in range(rounds):
            for k, (fn, inputs) in paths.items():
                best[k] = min(best[k], _time_fwd_bwd(fn, inputs, dy, calls))
        ratio = best["reference"] / best["native"]
        out[name] = dict(shape=shape, **best, speedup=ratio)
        print(f"  {name:<14} {str(shape):<14} reference {best['reference'] * 1e3:8.3f} ms  native "
              f"{best['native'] * 1e3:8.3f} ms  speed-up {ratio:5.2f}x (target >= 1.5x)")
    return out


# --------------------------------------------------------------------------- train.py

def _train(mode: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out-dir", out, "--no-progress", "--native", mode,
               "--threads", str(threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            tps = [json.loads(line)["tokens_per_s"] for line in fh]
        path_line = next((ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("native")), "?")
    return dict(tokens_per_s=statistics.median(tps[10:]), wall_s=wall, path=path_line)


def bench_train(threads: int, rounds: int):
    print(f"\n== python train.py (default run) with --native auto / off, {threads} threads (best of {rounds} "
          f"rounds, alternating; each figure from its best-throughput run)")
    best = {}
    for _ in range(rounds):
        for mode in ("auto", "off"):
            r = _train(mode, threads)
            if mode not in best or r["tokens_per_s"] > best[mode]["tokens_per_s"]:
                best[mode] = r
    for mode, r in best.items():
        print(f"  --native {mode:<5} {r['tokens_per_s']:10,.0f} tokens/s (median logged)  wall {r['wall_s']:6.1f} s"
              f"  summary: {r['path']}")
    print(f"  ratio native / off: {best['auto']['tokens_per_s'] / best['off']['tokens_per_s']:.3f}x tokens/s, "
          f"{best['off']['wall_s'] / best['auto']['wall_s']:.3f}x wall time")
    return best


# --------------------------------------------------------------------------- build

def bench_build():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LLAMA_TRN_NATIVE_CACHE=cache)
        code = "import kernels.native as n, json; print(json.dumps(n.info()))"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    info = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    print(f"\n== build into an empty cache: {info.get('build_s') or float('nan'):.1f} s (process wall {wall:.1f} s), "
          f"loaded {info.get('loaded')}, variant {info.get('isa')}; needs a C++17 compiler, CMake >= 3.18, ninja "
          f"(optional), torch's CMake package")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _kind, variant, n, steps, threads = args.child
        print(json.dumps(adamw_child(variant, int(float(n)), int(steps), int(threads))))
        return 0
    print(f"bench_kernels.native on {_cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    if "build" in args.sections:
        bench_build()
    if "adamw" in args.sections:
        bench_adamw(int(args.params), args.steps, args.threads)
    if "kernels" in args.sections:
        bench_kernels(args.threads, args.rounds)
    if "train" in args.sections:
        bench_train(args.threads, max(1, args.rounds - 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
