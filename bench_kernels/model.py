"""Benchmark: forward+backward tokens/s and peak memory of our Llama vs transformers' LlamaForCausalLM on CPU.

    python -m bench_kernels.model [--batch 4] [--seq 256] [--iters 8] [--threads 1]

Same config, same batch, fp32, kernels backend "reference" for ours. Config (a small Llama 2 shape with the
real vocabulary): vocab 32000, hidden 256, intermediate 688, 4 layers, 8 heads, 2 KV heads (GQA), head_dim 32.
Each step is loss = model(input_ids, labels); loss.backward(); grads set to None (no optimizer).

Method. Speed: all models live in one process and their steps are interleaved (ours, hf-eager, hf-sdpa,
ours, ...), so a shared, fluctuating machine slows them alike; tokens/s = batch * seq / median step time
over --iters steps after 2 warm-up steps. The speed ratio is paired: the median over rounds of (their step
time / our step time) within the same round, which cancels load that lasts longer than one round; the ratio of
the two medians is printed beside it. Memory: each model runs alone in a fresh subprocess; peak step
memory = the subprocess's peak resident set size (VmHWM) minus its resident set size just
before the first step (model and batch already built): the extra memory the training step needs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIG = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=2,
              max_seq_len=1024)
IMPLS = ("ours", "hf-eager", "hf-sdpa")


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kib() -> int:
    """VmHWM of this process (Linux): unlike getrusage's ru_maxrss it is not inherited across fork+exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _build(impl: str, batch: int, seq: int):
    """(model, step function) for one implementation, same weights init scheme, same batch."""
    import torch
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq))
    if impl == "ours":
        from kernels import ops
        from llama import Llama, LlamaConfig
        ops.set_backend("reference")
        model = Llama(LlamaConfig(**CONFIG))
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)     # pre-shifted

        def step():
            model(ids, labels=labels).backward()
    else:
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM
        hf = HFConfig(vocab_size=CONFIG["vocab_size"], hidden_size=CONFIG["hidden_size"],
                      intermediate_size=CONFIG["intermediate_size"], num_hidden_layers=CONFIG["num_layers"],
                      num_attention_heads=CONFIG["num_heads"], num_key_value_heads=CONFIG["num_kv_heads"],
                      max_position_embeddings=CONFIG["max_seq_len"], attn_implementation=impl.split("-")[1],
                      use_cache=False)
        model = LlamaForCausalLM(hf).float()
        labels = ids                                                                # HF shifts inside

        def step():
            model(input_ids=ids, labels=labels).loss.backward()
    model.train()

    def run():
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        for p in model.parameters():
            p.grad = None
        return dt
    return run


def _memory_child(impl: str, batch: int, seq: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    run = _build(impl, batch, seq)
    base = _rss_kib()
    for _ in range(3):
        run()
    peak = _peak_rss_kib()
    return dict(peak_step_mib=(peak - base) / 1024, peak_rss_mib=peak / 1024)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_memory_child(a.child, a.batch, a.seq, a.threads)))
        return
    import torch
    torch.set_num_threads(a.threads)
    print(f"config {CONFIG}\nbatch {a.batch} x seq {a.seq}, fp32, {a.threads} thread(s), kernels backend "
          f"'reference'; speed: median of {a.iters} interleaved steps; memory: peak RSS growth, own subprocess")
    rows = {}
    for impl in IMPLS:                 # memory first, in fresh subprocesses
        cmd = [sys.executable, "-m", "bench_kernels.model", "--child", impl, "--batch", str(a.batch),
               "--seq", str(a.seq), "--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    runs = {impl: _build(impl, a.batch, a.seq) for impl in IMPLS}
    times = {impl: [] for impl in IMPLS}
    for i in range(2 + a.iters):
        for impl in IMPLS:
            dt = runs[impl]()
            if i >= 2:
                times[impl].append(dt)
    for impl in IMPLS:
        med = statistics.median(times[impl])
        rows[impl].update(tokens_per_s=a.batch * a.seq / med, step_s=med)
        r = rows[impl]
        print(f"{impl:10s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  "
              f"peak step memory {r['peak_step_mib']:7.1f} MiB  (peak RSS {r['peak_rss_mib']:.0f} MiB)")
    for impl in IMPLS[1:]:
        paired = statistics.median(t / o for t, o in zip(times[impl], times["ours"]))
        spread = sorted(t / o for t, o in zip(times[impl], times["ours"]))
        print(f"ours vs {impl}: {paired:.2f}x tokens/s (paired median; rounds {spread[0]:.2f}-{spread[-1]:.2f}x; "
              f"ratio of medians {rows['ours']['tokens_per_s'] / rows[impl]['tokens_per_s']:.2f}x), "
              f"{rows['ours']['peak_step_mib'] / rows[impl]['peak_step_mib']:.2f}x peak step memory")


if __name__ == "__main__":
    main()
