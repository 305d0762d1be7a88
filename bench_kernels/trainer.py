"""Trainer throughput: ``python train.py`` (tiny config, CPU) against a plain Hugging Face ``LlamaForCausalLM`` loop.

    python -m bench_kernels.trainer [--steps 30] [--threads 2] [--precisions fp32 mixed] [--rounds 2] [--hf-compile]

Same model shape (the tiny preset, vocabulary 2048), same batches (our BatchLoader on the embedded corpus, seq 128,
global batch 16 in micro-batches of 8), same optimizer (AdamW lr 3e-3, betas 0.9/0.95, wd 0.1 on matrices, clip 1.0)
and precision (fp32, or fp32 weights + bf16 autocast for "mixed"). train.py's figure is the median of its logged
per-step ``tokens_per_s`` after the first 5 steps (it includes its own grad-norm, NaN-guard and logging work);
the HF loop's is the median step time over the same steps. train.py runs twice: eager, and with ``--compile``
(torch.compile of the whole model; its compile time falls in the first steps, which are not counted).
``--hf-compile`` adds, for information, the HF loop with ``torch.compile`` of its model.

Method: ``--rounds`` rounds, each running every path once in turn; a path's figure is its best round (load from
other processes on the shared cores only slows a run down, so the best round is the least disturbed one).
A benchmark, not a test: figures depend on the machine and its load. Target: train.py >= 1.5x the HF loop.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, MICRO, GLOBAL = 128, 8, 16


def ours(precision: str, steps: int, threads: int, compile: bool = False) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out-dir", out, "--precision", precision,
               "--max-steps", str(steps), "--threads", str(threads), "--no-progress", "--seq-len", str(SEQ),
               "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL), "--checkpoint-every", "0"]
        cmd += ["--compile"] if compile else []
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr)
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            tps = [json.loads(line)["tokens_per_s"] for line in fh]
    return statistics.median(tps[5:])


def hf(precision: str, steps: int, threads: int, compile: bool = False) -> float:
    import torch.nn.functional as F
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llama.data import BatchLoader, PackedDataset, prepare_default_data
    from training.config import load_config
    torch.set_num_threads(threads)
    cfg = load_config("tiny")
    mc = cfg.model_config()
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(HFConfig(**{k: v for k, v in mc.to_hf_dict().items()
                                         if k not in ("architectures", "torch_dtype", "dtype")}))
    model.train()
    if compile:
        from training.compile_cache import tag_compile_cache_with_cpu_isa   # inductor: cache ignores the ISA
        tag_compile_cache_with_cpu_isa()
        model.compile()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    data = prepare_default_data(cfg.data_cache)
    loader = BatchLoader(PackedDataset(data["sources"], SEQ, seed=cfg.seed), MICRO, seed=cfg.seed)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        micro = [loader.next() for _ in range(GLOBAL // MICRO)]
        n = sum(int((lbl != -100).sum()) for _, lbl in micro)
        for ids, lbl in micro:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "mixed"):
                logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), lbl.view(-1), ignore_index=-100,
                                   reduction="sum") / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return SEQ * GLOBAL / statistics.median(times[5:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench_kernels.trainer", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["fp32", "mixed"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hf-compile", action="store_true", help="also time the HF loop with torch.compile")
    a = p.parse_args(argv)
    print(f"tiny Llama, seq {SEQ}, global batch {GLOBAL} (micro {MICRO}), {a.steps} steps (median after 5), "
          f"{a.threads} threads, torch {torch.__version__}, best of {a.rounds} rounds")
    paths = [("train.py", lambda pr: ours(pr, a.steps, a.threads)),
             ("train.py --compile", lambda pr: ours(pr, a.steps, a.threads, compile=True)),
             ("HF loop", lambda pr: hf(pr, a.steps, a.threads))]
    if a.hf_compile:
        paths.append(("HF loop + compile", lambda pr: hf(pr, a.steps, a.threads, compile=True)))
    print(f"{'precision':<10} {'path':<20} {'tok/s (best)':>13} {'rounds':>24} {'vs HF loop':>11}")
    for prec in a.precisions:
        runs = {name: [] for name, _ in paths}
        for _ in range(a.rounds):
            for name, fn in paths:
                runs[name].append(fn(prec))
        base = max(runs["HF loop"])
        for name, _ in paths:
            r = ", ".join(f"{x:,.0f}" for x in runs[name])
            print(f"{prec:<10} {name:<20} {max(runs[name]):>13,.0f} {r:>24} {max(runs[name]) / base:>10.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
