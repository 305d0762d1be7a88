#!/usr/bin/env python
"""Train (or fine-tune) Llama 2 with tensor x data parallelism: ``python train.py`` or ``torchrun ... train.py``.

    python train.py                                   # tiny model, embedded corpus, a few minutes on 2 CPU cores
    python train.py --config llama2-7b --kernels nki  # on trn1 (see scripts/trn1/ and docs/trn1.md)
    torchrun --nproc_per_node 4 train.py --tp 2       # TP 2 x DP 2 (gloo on CPU, nccl on CUDA, xla on Neuron)

Flow: config -> distributed init -> (tp, dp) groups -> data -> model -> parallelize -> precision -> optimizer and
schedule -> resume -> loop. One step: read grad_accum micro-batches; count their valid tokens and all-reduce the
count over DP *before* the backward, so every rank divides by the same number; loss = sum over micro-batches of
summed token losses / global valid tokens; backward; sum the replicated (sequence-parallel norm) gradients over
TP; sum gradients over DP in fp32 (the loss is already globally normalised); global gradient norm (TP shards
summed, replicated tensors counted once) -> NaN/Inf guard -> clip -> AdamW -> schedule; metrics; checkpoint.
Numerics of the precision modes: training/precision.py. Checkpoint format and atomicity: training/checkpoint.py.
The XLA (trn1) path is real code but untested here (no Trainium in our CI); CPU and gloo are tested.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training.config import KERNELS, PRECISIONS, TrainConfigError, config_hash, load_config, parse_data_entry
from training.metrics import MetricsLogger, peak_tflops
from training.optim import (NanGuard, allreduce_grads, build_optimizer, build_scheduler, clip_grads_,
                            global_grad_norm, global_param_norm)
from training.precision import autocast_context, param_dtype, set_neuron_sr_env

EXIT_BAD_INPUT, EXIT_NAN = 2, 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset (tiny, llama2-7b, llama2-13b, llama2-70b) or TOML file")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out-dir", help="run directory (default runs/<model>-<time>)")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--kernels", choices=KERNELS, help="kernels.ops backend (default: nki on XLA, else reference)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-last", type=int)
    p.add_argument("--data", nargs="+", help="PREFIX[:WEIGHT] indexed datasets (default: the embedded corpus)")
    p.add_argument("--tokenizer", help="sentencepiece model of --data (checked against the model's vocabulary)")
    p.add_argument("--data-cache", help="where the embedded corpus is built once")
    p.add_argument("--init-from-hf", help="Hugging Face Llama directory to fine-tune from")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--tp", type=int, help="tensor-parallel degree (dp = world size / tp)")
    p.add_argument("--sequence-parallel", action="store_true", default=None)
    p.add_argument("--activation-checkpointing", choices=("none", "full", "selective"))
    p.add_argument("--zero1", action="store_true", default=None, help="ZeroRedundancyOptimizer over DP")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (CPU/CUDA; needs a C++ compiler on CPU)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--nan-guard-max-consecutive", type=int)
    p.add_argument("--peak-tflops", type=float, help="peak TFLOPS per device for MFU (default: table / measured)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "xla"))
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p.parse_args(argv)


def fail(msg: str, code: int = EXIT_BAD_INPUT):
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def init_distributed(device: str):
    """(world, rank, device) from torchrun's environment; process group gloo (CPU), nccl (CUDA), xla (Neuron)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "xla" if os.environ.get("NEURON_RT_VISIBLE_CORES") else "cpu"
    if device == "xla":                       # imported lazily: only trn1 has torch_xla (untested here)
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.xla_backend  # noqa: F401  registers the "xla" process-group backend
        if world > 1:
            dist.init_process_group("xla", init_method="xla://")
        return world, rank, xm.xla_device()
    if device == "cuda":
        torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return world, rank, torch.device("cuda", local) if device == "cuda" else torch.device("cpu")


def prepare_out_dir(out_dir: str, resume: bool):
    """Create and probe the run directory; refuse to overwrite a previous run unless resuming."""
    if not resume and os.path.isdir(out_dir) and (ckpt.list_checkpoints(out_dir) or
                                                   os.path.exists(os.path.join(out_dir, "metrics.jsonl"))):
        fail(f"--out-dir {out_dir} already holds a run (checkpoints / metrics.jsonl); pass --resume to continue it "
             f"or choose another --out-dir (nothing was changed)")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--out-dir {out_dir} is not writable: {e.strerror} ({e.filename})")


def build_data(cfg, model_cfg, dp_rank, dp_size):
    from llama.data import BatchLoader, PackedDataset, check_vocab, prepare_default_data
    if cfg.data:
        sources = [parse_data_entry(e) for e in cfg.data]
        tokenizer = cfg.tokenizer
    else:
        default = prepare_default_data(cfg.data_cache)
        sources, tokenizer = default["sources"], default["tokenizer"]
    if tokenizer:
        check_vocab(tokenizer, model_cfg.vocab_size)
    ds = PackedDataset(sources, cfg.seq_len, seed=cfg.seed, split="train", vocab_size=model_cfg.vocab_size)
    return BatchLoader(ds, cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)


def build_model(cfg, model_cfg, tp_group, device):
    import llama
    from llama import parallel
    torch.manual_seed(cfg.seed)               # every rank builds the same full weights, then keeps its shards
    if cfg.init_from_hf:
        model = llama.from_hf(cfg.init_from_hf, tp_group=tp_group if cfg.tp > 1 else None,
                              sequence_parallel=cfg.sequence_parallel)
    else:
        model = llama.Llama(model_cfg)
        if cfg.tp > 1:
            parallel.parallelize(model, tp_group, sequence_parallel=cfg.sequence_parallel)
    parallel.apply_activation_checkpointing(model, cfg.activation_checkpointing)
    model = model.to(device=device, dtype=param_dtype(cfg.precision))
    if cfg.compile:
        compile_model(model, device)
    return model


def compile_model(model, device):
    """torch.compile the whole model in place (``nn.Module.compile``: parameter names and checkpoints unchanged).

    The fusions matter on CPU at small widths, where eager time is per-op dispatch and elementwise passes: on the
    tiny config (2 threads, fp32) a step went from ~50 ms to ~34 ms (bench_kernels/trainer.py).
    """
    if device.type == "xla":
        fail("--compile: on XLA devices the step graph is already compiled by neuronx-cc; drop --compile")
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if not cxx or not shutil.which(cxx):
            fail("--compile on CPU needs a C++ compiler for torch.compile's inductor backend (g++ or clang++ on "
                 "PATH, or CXX=...); none found. Install one (apt install g++) or drop --compile")
    model.compile()


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def main(argv=None):
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    try:
        cfg = load_config(args.config, overrides)
        model_cfg = cfg.model_config()
    except (ValueError, OSError) as e:               # TrainConfigError, ConfigError, a missing --init-from-hf
        fail(str(e))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "xla" or (cfg.device == "auto" and os.environ.get("NEURON_RT_VISIBLE_CORES")):
        if cfg.precision == "bf16-sr":
            set_neuron_sr_env(cfg.seed)       # before the runtime starts: hardware SR on every fp32->bf16 cast
    world, rank, device = init_distributed(cfg.device)
    rank0 = rank == 0
    try:
        d = cfg.derive(world)
    except TrainConfigError as e:
        fail(str(e))
    dp, accum = d["dp"], d["grad_accum"]
    from kernels import ops
    from llama import parallel
    if cfg.kernels:
        try:
            ops.set_backend(cfg.kernels)
        except RuntimeError as e:                   # nki without the Neuron SDK: say so before any output exists
            fail(f"--kernels {cfg.kernels}: {e}")
    tp_group = dp_group = None
    if world > 1:
        tp_group, dp_group = parallel.make_groups(cfg.tp)
    tp_rank, dp_rank = rank % cfg.tp, rank // cfg.tp
    out_dir = cfg.out_dir or os.path.join("runs", f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if world > 1:                             # every rank must agree on the default's timestamp
        box = [out_dir]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
    if rank0:
        prepare_out_dir(out_dir, args.resume)
    identity = cfg.identity()
    identity.update(world_tp=cfg.tp, world_dp=dp)

    # ------------------------------------------------------------------ data, model, optimizer
    try:
        loader = build_data(cfg, model_cfg, dp_rank, dp)
    except (ValueError, OSError) as e:
        fail(f"data: {e}")
    try:
        model = build_model(cfg, model_cfg, tp_group, device)
    except (ValueError, OSError) as e:               # llama.hf.CheckpointError, ParallelError, unreadable shards
        fail(f"model: {e}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg, tp_rank, dp_group, hardware_sr=device.type == "xla")
    scheduler = build_scheduler(optimizer, cfg)
    guard = NanGuard(cfg.nan_guard_max_consecutive)
    local_opt = optimizer.optim if cfg.zero1 else optimizer   # ZeRO-1: each rank saves its own shard's state

    step, tokens_seen = 0, 0
    if args.resume:
        try:
            path = ckpt.latest_checkpoint(out_dir)
            meta = ckpt.read_meta(path)
            diff = ckpt.diff_identity(meta["identity"], identity)
            if diff:
                raise ckpt.CheckpointError(f"checkpoint {path} was written by another configuration; differing "
                                           f"keys: " + "; ".join(diff))
            state = ckpt.load(path, tp_rank, dp_rank)
        except ckpt.CheckpointError as e:
            fail(str(e))
        model.load_state_dict(state["model"])
        local_opt.load_state_dict(state["optimizer"])
        if cfg.zero1:                         # ZeRO-1 syncs group keys (lr, sr_step) from its own groups
            for zg, lg in zip(optimizer.param_groups, local_opt.param_groups):
                zg.update({k: v for k, v in lg.items() if k != "params"})
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state["nan_guard"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]

    flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
    peak, peak_src = peak_tflops(device.type, param_dtype(cfg.precision) if cfg.precision != "mixed"
                                 else torch.bfloat16, cfg.peak_tflops)
    logger = MetricsLogger(out_dir, resume_step=step if args.resume else None) if rank0 else None
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    nan_steps = {int(s) for s in os.environ.get("LLAMA_TRAIN_FAULT_NAN_STEPS", "").split(",") if s.strip()}
    if rank0:
        print(f"train.py: {cfg.model} ({model_cfg.num_params() / 1e6:.2f}M params), precision {cfg.precision}, "
              f"kernels {ops.get_backend() if hasattr(ops, 'get_backend') else cfg.kernels}, world {world} = tp "
              f"{cfg.tp} x dp {dp}, global batch {cfg.global_batch_size} = micro {cfg.micro_batch_size} x dp {dp} "
              f"x accum {accum}, seq {cfg.seq_len}, steps {step} -> {cfg.max_steps}, out {out_dir}", flush=True)

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (rank0 and cfg.progress), dynamic_ncols=True,
               file=sys.stdout)
    step_times, last_loss, t_start, saved_at = [], None, time.perf_counter(), None
    model.train()
    # ------------------------------------------------------------------ the loop
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        micro = [loader.next() for _ in range(accum)]
        n_valid = torch.tensor(sum(int((lbl != -100).sum()) for _, lbl in micro), dtype=torch.float32, device=device)
        if dp_group is not None and dp > 1:
            dist.all_reduce(n_valid, group=dp_group)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for ids, lbl in micro:
            with autocast_context(cfg.precision, device.type):
                loss = model(ids.to(device), labels=lbl.to(device), reduction="sum")
            if step + 1 in nan_steps:
                loss = loss * float("nan")    # test hook: a poisoned step (LLAMA_TRAIN_FAULT_NAN_STEPS=5,6)
            (loss / n_valid.clamp(min=1)).backward()
            loss_sum += loss.detach().float()
        parallel.allreduce_replicated_grads(model)
        allreduce_grads(params, dp_group if dp > 1 else None)
        grad_norm = global_grad_norm(params, tp_group if cfg.tp > 1 else None)
        ok = guard.check(grad_norm)
        if ok:
            clip_grads_(params, grad_norm, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "xla":
            import torch_xla.core.xla_model as xm
            xm.mark_step()
        step += 1
        tokens_seen += tokens_per_step
        if not ok and guard.exhausted:
            bar.close()
            fail(f"{guard.consecutive} consecutive steps with a non-finite gradient norm (last at step {step}); "
                 f"stopping. The last good checkpoint is intact in {ckpt.checkpoint_root(out_dir)}", EXIT_NAN)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if dp > 1:
                dist.all_reduce(loss_sum, group=dp_group)
            last_loss = float(loss_sum / n_valid.clamp(min=1))
            dt = time.perf_counter() - t0
            step_times.append(dt)
            tps = tokens_per_step / dt
            mfu = flops_per_token * tps / (peak * 1e12 * world)
            # on log steps only: one more pass over the weights (and a host sync on XLA)
            param_norm = float(global_param_norm(params, tp_group if cfg.tp > 1 else None))
            if rank0:
                logger.log(step, loss=last_loss, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                           param_norm=param_norm, tokens_per_s=tps, sequences_per_s=tps / cfg.seq_len, mfu=mfu,
                           step_time_s=dt, skipped=int(not ok),
                           skipped_total=guard.skipped, tokens=tokens_seen)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.2f}%")
        bar.update(1)
        # no checkpoint inside a run of skipped steps: the last one written stays the last good one
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 or step == cfg.max_steps) and ok:
            save_checkpoint(cfg, out_dir, step, model, local_opt, scheduler, loader, guard, tokens_seen, identity,
                            tp_rank, dp_rank)
            saved_at = step
    bar.close()

    # ------------------------------------------------------------------ summary
    if rank0:
        wall = time.perf_counter() - t_start
        steady = step_times[len(step_times) // 10 + 1:] or step_times
        mean_tps = tokens_per_step / (sum(steady) / len(steady)) if steady else float("nan")
        mfu = flops_per_token * mean_tps / (peak * 1e12 * world)
        # A resume that finds the run already complete trains no step: there is no loss to report.
        final_loss = f"{last_loss:.4f}" if last_loss is not None else "n/a (no step run by this invocation)"
        logger.close()
        try:
            from training.plot import plot_runs
            plot_runs([out_dir], os.path.join(out_dir, "loss.png"), labels=[cfg.precision],
                      title=f"{cfg.model} {cfg.precision} loss")
        except Exception as e:                # the run's results stand without the picture
            print(f"train.py: warning: loss.png not written: {e}", file=sys.stderr)
        print(f"\ntrain.py summary\n  steps           {step} (skipped by the NaN guard: {guard.skipped})\n"
              f"  tokens          {tokens_seen:,}\n  wall time       {wall:.1f} s\n"
              f"  tokens/s        {mean_tps:,.0f} (mean after the first {len(step_times) - len(steady)} logged "
              f"steps)\n  MFU             {100 * mfu:.2f}% ({flops_per_token / 1e6:.2f} MFLOP/token; peak "
              f"{peak:.3g} TFLOPS/device x {world}: {peak_src})\n  final loss      {final_loss}\n"
              f"  last checkpoint step {saved_at}\n  output          {out_dir}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def save_checkpoint(cfg, out_dir, step, model, opt, scheduler, loader, guard, tokens_seen, identity, tp_rank, dp_rank):
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=scheduler.state_dict(),
                 loader=loader.state_dict(), nan_guard=guard.state_dict(), rng=rng_state(), step=step,
                 tokens_seen=tokens_seen,
                 sr=dict(seed=cfg.seed, rule="bits of step s come from sr_seed(seed, s, stream); see precision.py"))
    meta = dict(identity=identity, config_hash=config_hash(identity), precision=cfg.precision, tp=cfg.tp,
                dp=identity["world_dp"], time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    ckpt.save(out_dir, step, state, meta, tp_rank, dp_rank, cfg.keep_last)


if __name__ == "__main__":
    sys.exit(main())
