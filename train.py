#!/usr/bin/env python
"""Train (or fine-tune) Llama 2 with tensor x pipeline x data parallelism: ``python train.py`` or ``torchrun train.py``.

    python train.py                                   # tiny model, embedded corpus, a few minutes on 2 CPU cores
    python train.py --config llama2-7b --kernels nki  # on trn1 (see scripts/trn1/ and docs/trn1.md)
    torchrun --nproc_per_node 4 train.py --tp 2       # TP 2 x DP 2 (gloo on CPU, nccl on CUDA, xla on Neuron)
    torchrun --nproc_per_node 4 train.py --pp 2       # PP 2 x DP 2: llama.pipeline stages, 1F1B schedule

With --pp the gradient-accumulation micro-batches are the pipeline's micro-batches (torch.distributed.pipelining
runs them: --pp-schedule gpipe | 1f1b | interleaved with --virtual-stages); the loss is the last stage's, broadcast
to rank 0 for the metrics.

Flow (``main``, one function per phase): resolve_config -> start_run (threads, process group, kernels, TP/DP
groups, run directory) -> build_trainable (data, model, parallelize, precision, optimizer, schedule) ->
resume_from_checkpoint -> start_metrics -> train_loop -> summarize. One step (forward_backward, optimizer_step):
read grad_accum micro-batches; count their valid tokens and all-reduce the count over DP *before* the backward,
so every rank divides by the same number; loss = sum over micro-batches of summed token losses / global valid
tokens; backward; sum the replicated (sequence-parallel norm) gradients over TP; sum gradients over DP in fp32
(the loss is already globally normalised); global gradient norm (TP shards summed, replicated tensors counted
once) -> NaN/Inf guard -> clip -> AdamW -> schedule; then log_step and save_checkpoint.
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training.config import (KERNELS, NATIVE, PRECISIONS, TrainConfig, TrainConfigError, config_hash, load_config,
                             parse_data_entry)
from training.compile_cache import tag_compile_cache_with_cpu_isa
from training.metrics import MetricsLogger, Peak, peak_tflops
from training.optim import (NanGuard, allreduce_grads, build_optimizer, build_scheduler, clip_grads_,
                            global_grad_norm, global_param_norm, lr_lambda)
from training.precision import MATMUL_ENV, MatmulPlan, compute_context, matmul_plan, param_dtype, set_neuron_sr_env

EXIT_BAD_INPUT, EXIT_NAN, EXIT_INTERRUPTED = 2, 3, 130
RUN_FLAGS = ("config", "resume", "resume_fallback", "allow_hparam_change")   # flags that are not TrainConfig fields
# What --resume must agree on besides the identity (which fixes the model and data); change them only explicitly.
HPARAMS = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset (tiny, llama2-7b, llama2-13b, llama2-70b) or TOML file")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out-dir", help="run directory (default runs/<model>-<time>)")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--native", choices=NATIVE,
                   help="native C++ CPU kernels (kernels/native: fused AdamW-SR, RMSNorm, SwiGLU); auto (default): "
                        "on CPU when they build; off: the PyTorch composites")
    p.add_argument("--kernels", choices=KERNELS, help="kernels.ops backend (default: nki on XLA, else reference)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    p.add_argument("--resume-fallback", action="store_true",
                   help="with --resume: if the newest checkpoint fails its checksums, resume from the newest intact one")
    p.add_argument("--allow-hparam-change", action="store_true",
                   help="with --resume: apply changed optimizer/schedule flags (lr, betas, eps, weight decay, warmup, "
                        "max steps, min lr, clip) and record the change in metrics.jsonl, instead of refusing")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-last", type=int)
    p.add_argument("--data", nargs="+", help="PREFIX[:WEIGHT] indexed datasets (default: the embedded corpus)")
    p.add_argument("--tokenizer", help="sentencepiece model of --data (checked against the model's vocabulary)")
    p.add_argument("--data-cache", help="where the embedded corpus is built once")
    p.add_argument("--verify-data", choices=("fast", "full", "off"),
                   help="check --data against the checksums python -m llama.data recorded (default fast: indexes and "
                        "sizes in full, .bin in full up to 256 MiB, sampled above; see llama/data/checksums.py)")
    p.add_argument("--init-from-hf", help="Hugging Face Llama directory to fine-tune from")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--tp", type=int, help="tensor-parallel degree (dp = world size / (tp x pp))")
    p.add_argument("--pp", type=int, help="pipeline stages (llama.pipeline; micro-batches = gradient accumulation)")
    p.add_argument("--pp-schedule", choices=("gpipe", "1f1b", "interleaved"), help="pipeline schedule (default 1f1b)")
    p.add_argument("--virtual-stages", type=int, help="stages per rank for --pp-schedule interleaved")
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


@dataclass
class Run:
    """Where and how this process trains: the resolved configuration, the world layout and the run directory."""
    cfg: TrainConfig
    model_cfg: object                       # llama.LlamaConfig
    world: int
    rank: int
    device: torch.device
    dp: int
    accum: int
    tp_group: object = None
    dp_group: object = None
    pp_group: object = None
    out_dir: str = ""
    identity: dict = field(default_factory=dict)
    native: str = ""                        # which path the CPU hot path takes (select_native)
    plan: MatmulPlan | None = None          # how bf16 matmuls compute (training.precision.matmul_plan)
    lock: object = None                     # rank 0: training.rundir.RunDirLock, held for the whole run

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    @property
    def tp_rank(self) -> int:
        return self.rank % self.cfg.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cfg.tp % self.dp       # llama.parallel.make_groups' layout: pp outermost

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.cfg.tp * self.dp)

    @property
    def pp_reduce(self):
        return self.pp_group if self.cfg.pp > 1 else None

    @property
    def tp_reduce(self):
        """The TP group when there is one to reduce over, else None."""
        return self.tp_group if self.cfg.tp > 1 else None

    @property
    def dp_reduce(self):
        return self.dp_group if self.dp > 1 else None


@dataclass
class Trainable:
    """What the loop updates and checkpoints."""
    loader: object
    model: torch.nn.Module
    params: list
    optimizer: object
    local_opt: object                       # ZeRO-1: the rank's own shard of the optimizer (what it saves)
    scheduler: object
    guard: NanGuard
    pipeline: object = None                 # --pp: llama.pipeline.Pipeline over the stages of ``model``


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    last_loss: float | None = None
    saved_at: int | None = None
    step_times: list = field(default_factory=list)
    hparam_changes: dict = field(default_factory=dict)   # applied on resume with --allow-hparam-change


@dataclass
class Meter:
    """MFU inputs and the rank-0 metrics writer."""
    flops_per_token: float
    peak: Peak                              # per device, of the dtype the matmuls compute in
    tokens_per_step: int
    logger: MetricsLogger | None
    t_start: float

    def mfu(self, tokens_per_s: float, world: int) -> float:
        return self.peak.mfu(self.flops_per_token * tokens_per_s / world / 1e12)


def main(argv=None):
    args = parse_args(argv)
    cfg, model_cfg = resolve_config(args)
    run = start_run(cfg, model_cfg, args.resume)
    try:
        parts = build_trainable(run)
        progress = resume_from_checkpoint(run, parts, args) if args.resume else Progress()
        meter = start_metrics(run, progress)
        announce(run, progress)
        train_loop(run, parts, progress, meter)
        if run.rank0:
            summarize(run, parts, progress, meter)
    except KeyboardInterrupt:                 # Ctrl-C: one line; checkpoints are atomic, so --resume stays exact
        saved = ckpt.list_checkpoints(run.out_dir)
        where = f"--resume continues from step {saved[-1][0]}" if saved else "no checkpoint was written yet"
        fail(f"interrupted (Ctrl-C); {where} (--out-dir {run.out_dir})", EXIT_INTERRUPTED)
    except OSError as e:                      # the run directory stopped being writable mid-run (disk, mount)
        fail(f"--out-dir {run.out_dir}: cannot write {e.filename or ''} ({e.strerror or e}); the checkpoints "
             f"written before are intact")
    finally:
        if run.lock is not None:
            run.lock.release()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------- phase 1: configuration
def resolve_config(args):
    """The TrainConfig (preset or TOML, then flags) and the model shape it trains; bad input exits 2."""
    overrides = {k: v for k, v in vars(args).items() if k not in RUN_FLAGS}
    try:
        cfg = load_config(args.config, overrides)
        return cfg, cfg.model_config()
    except (ValueError, OSError) as e:               # TrainConfigError, ConfigError, a missing --init-from-hf
        fail(str(e))


# ---------------------------------------------------------------------- phase 2: processes, kernels, run dir
def start_run(cfg, model_cfg, resume: bool) -> Run:
    """Threads, Neuron SR, the process group, the kernel backend, the TP/DP groups and the run directory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "xla" or (cfg.device == "auto" and os.environ.get("NEURON_RT_VISIBLE_CORES")):
        if cfg.precision == "bf16-sr":
            set_neuron_sr_env(cfg.seed)       # before the runtime starts: hardware SR on every fp32->bf16 cast
    world, rank, device = init_distributed(cfg.device)
    try:
        d = cfg.derive(world)
    except TrainConfigError as e:
        fail(str(e))
    run = Run(cfg, model_cfg, world, rank, device, dp=d["dp"], accum=d["grad_accum"])
    try:
        run.plan = matmul_plan(cfg.precision, device.type)
    except ValueError as e:
        fail(str(e))
    select_kernels(cfg)
    run.native = select_native(cfg, device)
    check_pipeline(cfg, model_cfg, world, run.accum)
    if world > 1:
        from llama import parallel
        if cfg.pp > 1:
            run.tp_group, run.pp_group, run.dp_group = parallel.make_groups(cfg.tp, cfg.pp)
        else:
            run.tp_group, run.dp_group = parallel.make_groups(cfg.tp)
    run.out_dir = resolve_out_dir(cfg, world)
    if run.rank0:
        run.lock = prepare_out_dir(run.out_dir, resume)
    run.identity = dict(cfg.identity(), world_tp=cfg.tp, world_dp=run.dp)
    return run


def check_pipeline(cfg, model_cfg, world: int, accum: int):
    """--pp / --virtual-stages: the layout must suit the model and the batch (exit 2 before anything exists)."""
    if cfg.pp == 1 and cfg.virtual_stages == 1:
        return
    from llama.pipeline import check_layout
    try:
        check_layout(model_cfg, world, cfg.tp, cfg.pp, cfg.pp_schedule, cfg.virtual_stages, accum)
    except ValueError as e:
        fail(f"--pp {cfg.pp}: {e}")
    if cfg.compile:
        fail("--compile with --pp: torch.compile of pipeline stages is not supported; drop one of them")


def select_native(cfg, device) -> str:
    """kernels.native for this run (building it once on first use); returns what the summary says about it."""
    from kernels import native, ops
    if device.type != "cpu":
        native.set_mode("off")
        return f"off (a {device.type} run; the native kernels are for CPU)"
    try:
        native.set_mode(cfg.native)
    except RuntimeError as e:                       # --native on without a working build: say why, before output
        fail(f"--native on: {e}")
    if cfg.native == "off":
        return "off (--native off): PyTorch composites"
    if not native.enabled():
        return f"off (unavailable: {native.unavailable_reason()}): PyTorch composites"
    used = (["fused AdamW-SR"] if cfg.precision == "bf16-sr" else []) + \
        (["RMSNorm", "SwiGLU"] if ops.get_backend() == "reference" else [])
    return f"on ({native.info()['isa']}): {', '.join(used) or 'nothing in this configuration'}"


def select_kernels(cfg):
    from kernels import ops
    if cfg.kernels:
        try:
            ops.set_backend(cfg.kernels)
        except RuntimeError as e:                   # nki without the Neuron SDK: say so before any output exists
            fail(f"--kernels {cfg.kernels}: {e}")


def resolve_out_dir(cfg, world: int) -> str:
    out_dir = cfg.out_dir or os.path.join("runs", f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if world > 1:                             # every rank must agree on the default's timestamp
        box = [out_dir]
        dist.broadcast_object_list(box, src=0)
        out_dir = box[0]
    return out_dir


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
    """Create and probe the run directory, take its lock (one train.py per directory), and refuse to overwrite a
    previous run unless resuming. A run stopped before its first checkpoint left nothing to resume: a fresh start
    replaces its metrics. Returns the lock (held until the process exits)."""
    from training import rundir
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
        lock = rundir.lock(out_dir)
    except OSError as e:
        fail(f"--out-dir {out_dir} is not writable: {e.strerror} ({e.filename})")
    except rundir.RunDirBusy as e:
        fail(str(e))
    if not resume and ckpt.list_checkpoints(out_dir):
        lock.release()
        fail(f"--out-dir {out_dir} already holds a run (checkpoints / metrics.jsonl); pass --resume to continue it "
             f"or choose another --out-dir (nothing was changed)")
    if not resume and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        print(f"train.py: note: {out_dir} holds metrics of a run stopped before its first checkpoint; starting "
              f"afresh and replacing them", file=sys.stderr)
    return lock


# ---------------------------------------------------------------------- phase 3: data, model, optimizer
def build_trainable(run: Run) -> Trainable:
    cfg = run.cfg
    try:
        loader = build_data(cfg, run.model_cfg, run.dp_rank, run.dp)
    except (ValueError, OSError) as e:
        fail(f"data: {e}")
    try:
        model, pipe = build_pipeline(run) if cfg.pp > 1 else \
            (build_model(cfg, run.model_cfg, run.tp_group, run.device), None)
    except (ValueError, OSError) as e:               # llama.hf.CheckpointError, ParallelError, unreadable shards
        fail(f"model: {e}")
    except Exception as e:                           # safetensors' own error type for a corrupt file
        if type(e).__name__ != "SafetensorError":
            raise
        fail(f"model: --init-from-hf {cfg.init_from_hf}: {unreadable_safetensors(cfg.init_from_hf)} is corrupt or "
             f"not a safetensors file ({e})")
    optimizer = build_optimizer(model, cfg, run.tp_rank, run.dp_group, hardware_sr=run.device.type == "xla")
    return Trainable(loader=loader, model=model, params=[p for p in model.parameters() if p.requires_grad],
                     optimizer=optimizer, local_opt=optimizer.optim if cfg.zero1 else optimizer,
                     scheduler=build_scheduler(optimizer, cfg), guard=NanGuard(cfg.nan_guard_max_consecutive),
                     pipeline=pipe)


def unreadable_safetensors(hf_dir: str) -> str:
    """The first *.safetensors file of hf_dir that safetensors cannot open (to name it in the error)."""
    import glob

    from safetensors import safe_open
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        try:
            with safe_open(f, framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception:
            return f
    return f"a weights file in {hf_dir}"


def build_data(cfg, model_cfg, dp_rank, dp_size):
    from llama.data import BatchLoader, PackedDataset, check_vocab, prepare_default_data
    from llama.data.checksums import check_tokenizer
    if cfg.data:
        sources = [parse_data_entry(e) for e in cfg.data]
        tokenizer = cfg.tokenizer
    else:
        default = prepare_default_data(cfg.data_cache)
        sources, tokenizer = default["sources"], default["tokenizer"]
    if tokenizer:
        check_vocab(tokenizer, model_cfg.vocab_size)
        for prefix, _ in sources if cfg.data else []:
            check_tokenizer(prefix, tokenizer)         # the tokenizer the data was made with (sha256)
    ds = PackedDataset(sources, cfg.seq_len, seed=cfg.seed, split="train", vocab_size=model_cfg.vocab_size,
                       verify=cfg.verify_data)
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



def build_pipeline(run: Run):
    """--pp: (this rank's stages as one llama.pipeline.LocalModel, their llama.pipeline.Pipeline). The weights are
    those build_model would make (same seed, or the --init-from-hf slices of this rank's stages only)."""
    import llama
    from llama import parallel, pipeline
    cfg, tp_group = run.cfg, run.tp_group if run.cfg.tp > 1 else None
    stages = dict(pp=cfg.pp, pp_rank=run.pp_rank, virtual=cfg.virtual_stages)
    torch.manual_seed(cfg.seed)
    if cfg.init_from_hf:
        local = llama.from_hf(cfg.init_from_hf, tp_group=tp_group, sequence_parallel=cfg.sequence_parallel,
                              pipeline=stages)
    else:
        model = llama.Llama(run.model_cfg)
        if tp_group is not None:
            parallel.parallelize(model, tp_group, sequence_parallel=cfg.sequence_parallel)
        local = pipeline.LocalModel(pipeline.split_stages(model, **stages))
    parallel.apply_activation_checkpointing(local, cfg.activation_checkpointing)
    dtype = param_dtype(cfg.precision)
    local.to(device=run.device, dtype=dtype)  # in place: the stages share these parameters
    return local, pipeline.Pipeline(local.stages, run.pp_group, cfg.pp_schedule, run.accum, cfg.micro_batch_size,
                                    cfg.seq_len, run.device, dtype)


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
        tag_compile_cache_with_cpu_isa()
    model.compile()


# ---------------------------------------------------------------------- phase 4: resume
def resume_from_checkpoint(run: Run, parts: Trainable, args) -> Progress:
    """Load the newest intact checkpoint of --out-dir into ``parts``; it must come from the same configuration
    and the same optimizer/schedule settings (unless --allow-hparam-change, which applies and records them)."""
    try:
        path = choose_checkpoint(run.out_dir, args.resume_fallback)
        meta = ckpt.read_meta(path)
        from training import reshard     # tp / pp may differ: the checkpoint is then resharded
        diff = ckpt.diff_identity(*({k: v for k, v in d.items() if k not in reshard.LAYOUT_KEYS}
                                    for d in (meta["identity"], run.identity)))
        if diff:
            raise ckpt.CheckpointError(f"checkpoint {path} was written by another configuration; differing "
                                       f"keys: " + "; ".join(diff))
        changes = hparam_changes(meta, run.cfg)
        if changes and not args.allow_hparam_change:
            raise ckpt.CheckpointError(
                f"--resume with optimizer/schedule settings that differ from checkpoint {path}: "
                + "; ".join(f"{k}: checkpoint {a!r} != now {b!r}" for k, (a, b) in changes.items())
                + ". Pass the checkpoint's values, or --allow-hparam-change to apply the new ones (recorded in "
                  "metrics.jsonl)")
        if reshard.layout_of(meta) == (run.cfg.tp, run.cfg.pp, run.dp):
            state = ckpt.load(path, run.tp_rank, run.dp_rank, run.pp_rank)
        else:                                   # saved under another (tp, pp): rebuild this rank's shards
            reshard.check_reshardable(path, meta, run.cfg.tp, run.cfg.pp, run.dp, run.cfg.zero1)
            state = reshard.resharded_state(path, meta, run.model_cfg, parts.model, parts.local_opt,
                                            optimizer_param_names(parts), run.cfg.tp, run.tp_rank, run.dp_rank)
    except ckpt.CheckpointError as e:
        fail(str(e))
    parts.model.load_state_dict(state["model"])
    parts.local_opt.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if changes:
        apply_hparams(parts, run.cfg)
    if run.cfg.zero1:                         # ZeRO-1 syncs group keys (lr, sr_step) from its own groups
        for zg, lg in zip(parts.optimizer.param_groups, parts.local_opt.param_groups):
            zg.update({k: v for k, v in lg.items() if k != "params"})
    parts.loader.load_state_dict(state["loader"])
    parts.guard.load_state_dict(state["nan_guard"])
    set_rng_state(state["rng"])
    saved = meta.get("matmul_compute")
    if saved and saved != run.plan.compute and not os.environ.get(MATMUL_ENV):
        # the same GEMMs as before the interruption, so the resumed run stays bitwise the uninterrupted one
        run.plan = MatmulPlan(saved, f"as the resumed checkpoint's run (this start measured: {run.plan.reason})")
    return Progress(step=state["step"], tokens_seen=state["tokens_seen"], hparam_changes=changes)


def choose_checkpoint(out_dir: str, fallback: bool) -> str:
    """The newest checkpoint if it is complete and intact (sizes and sha256 of every rank file); otherwise the
    newest intact one with --resume-fallback, or an error naming it."""
    try:
        newest = ckpt.latest_checkpoint(out_dir)
        ckpt.verify(newest)
        return newest
    except ckpt.CheckpointError as e:
        if not ckpt.list_checkpoints(out_dir):
            raise                              # nothing to fall back to: the "no checkpoint" error as it is
        intact = ckpt.newest_intact(out_dir)
        if fallback and intact:
            print(f"train.py: warning: {e}; resuming from the newest intact checkpoint {intact} (--resume-fallback)",
                  file=sys.stderr, flush=True)
            return intact
        hint = (f"; the newest intact checkpoint is {intact}: pass --resume-fallback to resume from it" if intact
                else "; no intact checkpoint remains")
        raise ckpt.CheckpointError(f"{e}{hint}") from None


def hparam_changes(meta: dict, cfg) -> dict:
    """{name: (checkpoint value, current value)} of the HPARAMS that differ (checkpoints that predate the record:
    none)."""
    saved = meta.get("hparams") or {}
    return {k: (saved[k], getattr(cfg, k)) for k in HPARAMS if k in saved and saved[k] != getattr(cfg, k)}


def apply_hparams(parts: Trainable, cfg) -> None:
    """Put the current settings into the restored optimizer groups and schedule (at the restored step)."""
    sched = parts.scheduler
    sched.base_lrs = [cfg.lr] * len(sched.base_lrs)
    sched.lr_lambdas = [lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)] * len(sched.base_lrs)
    for g, base, f in zip(parts.local_opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * f(sched.last_epoch)
        g["betas"], g["eps"] = (cfg.beta1, cfg.beta2), cfg.eps
        if all(p.ndim >= 2 for p in g["params"]):            # the decay groups (training.optim.param_groups)
            g["weight_decay"] = cfg.weight_decay
    sched._last_lr = [g["lr"] for g in parts.local_opt.param_groups]


def optimizer_param_names(parts: Trainable) -> list:
    """Names of the (local) optimizer's parameters in its state_dict order: what resharding matches by."""
    name_of = {id(p): n for n, p in parts.model.named_parameters()}
    return [name_of[id(p)] for g in parts.local_opt.param_groups for p in g["params"]]


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)



def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])



# ---------------------------------------------------------------------- phase 5: metrics
def start_metrics(run: Run, progress: Progress) -> Meter:
    cfg = run.cfg
    peak = Peak(*peak_tflops(run.device.type, run.plan.dtype, cfg.peak_tflops))
    logger = MetricsLogger(run.out_dir, resume_step=progress.step if progress.step else None) if run.rank0 else None
    if logger is not None and progress.hparam_changes:
        logger.log(progress.step, event="hparams_changed",
                   changes={k: {"checkpoint": a, "now": b} for k, (a, b) in progress.hparam_changes.items()})
    return Meter(flops_per_token=run.model_cfg.flops_per_token(cfg.seq_len), peak=peak,
                 tokens_per_step=cfg.global_batch_size * cfg.seq_len, logger=logger, t_start=time.perf_counter())


def announce(run: Run, progress: Progress):
    if not run.rank0:
        return
    from kernels import ops
    cfg = run.cfg
    print(f"train.py: {cfg.model} ({run.model_cfg.num_params() / 1e6:.2f}M params), precision {cfg.precision}, "
          f"kernels {ops.get_backend() if hasattr(ops, 'get_backend') else cfg.kernels}, world {run.world} = tp "
          f"{cfg.tp} x pp {cfg.pp} x dp {run.dp},"
          f" global batch {cfg.global_batch_size} = micro {cfg.micro_batch_size} x dp "
          f"{run.dp} x accum {run.accum}, seq {cfg.seq_len}, steps {progress.step} -> {cfg.max_steps}, out "
          f"{run.out_dir}\n  matmuls in {run.plan.compute} ({run.plan.reason})\n  native kernels {run.native}",
          flush=True)


# ---------------------------------------------------------------------- phase 6: the loop
def train_loop(run: Run, parts: Trainable, progress: Progress, meter: Meter):
    from tqdm import tqdm
    cfg = run.cfg
    nan_steps = {int(s) for s in os.environ.get("LLAMA_TRAIN_FAULT_NAN_STEPS", "").split(",") if s.strip()}
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not (run.rank0 and cfg.progress),
               dynamic_ncols=True, file=sys.stdout)
    parts.model.train()
    meter.t_start = time.perf_counter()
    while progress.step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum, n_valid = forward_backward(run, parts, poison=progress.step + 1 in nan_steps)
        grad_norm, ok = optimizer_step(run, parts)
        progress.step += 1
        progress.tokens_seen += meter.tokens_per_step
        if not ok and parts.guard.exhausted:
            bar.close()
            fail(f"{parts.guard.consecutive} consecutive steps with a non-finite gradient norm (last at step "
                 f"{progress.step}); stopping. The last good checkpoint is intact in "
                 f"{ckpt.checkpoint_root(run.out_dir)}", EXIT_NAN)
        if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
            log_step(run, parts, progress, meter, loss_sum, n_valid, grad_norm, ok, time.perf_counter() - t0, bar)
        bar.update(1)
        # no checkpoint inside a run of skipped steps: the last one written stays the last good one
        due = cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.max_steps
        if due and ok:
            save_checkpoint(run, parts, progress)
            progress.saved_at = progress.step
    bar.close()


def forward_backward(run: Run, parts: Trainable, poison: bool):
    """grad_accum micro-batches; the loss is normalised by the valid tokens of the whole global batch, counted
    (and all-reduced over DP) before the backward so every rank divides by the same number."""
    device = run.device
    micro = [parts.loader.next() for _ in range(run.accum)]
    n_valid = torch.tensor(sum(int((lbl != -100).sum()) for _, lbl in micro), dtype=torch.float32, device=device)
    if run.dp_reduce is not None:
        dist.all_reduce(n_valid, group=run.dp_group)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    if parts.pipeline is not None:            # the pipeline's micro-batches are these micro-batches
        ids, lbl = torch.cat([m[0] for m in micro]).to(device), torch.cat([m[1] for m in micro]).to(device)
        with compute_context(run.cfg.precision, device.type, run.plan):
            loss = parts.pipeline.step(ids, lbl, n_valid * float("nan") if poison else n_valid)
        if loss is not None:                  # the last stage: sum of token losses, as below
            loss_sum += loss * n_valid.clamp(min=1)
        return loss_sum, n_valid
    for ids, lbl in micro:
        with compute_context(run.cfg.precision, device.type, run.plan):
            loss = parts.model(ids.to(device), labels=lbl.to(device), reduction="sum")
        if poison:
            loss = loss * float("nan")        # test hook: a poisoned step (LLAMA_TRAIN_FAULT_NAN_STEPS=5,6)
        (loss / n_valid.clamp(min=1)).backward()
        loss_sum += loss.detach().float()
    return loss_sum, n_valid


def optimizer_step(run: Run, parts: Trainable):
    """Gradient reductions (TP replicated, DP in fp32), the global norm, the NaN guard, clip, AdamW, schedule."""
    from llama import parallel
    parallel.allreduce_replicated_grads(parts.model)
    allreduce_grads(parts.params, run.dp_reduce)
    grad_norm = global_grad_norm(parts.params, run.tp_reduce, run.pp_reduce)
    ok = parts.guard.check(grad_norm)
    if ok:
        clip_grads_(parts.params, grad_norm, run.cfg.grad_clip)
        parts.optimizer.step()
        parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "xla":
        import torch_xla.core.xla_model as xm
        xm.mark_step()
    return grad_norm, ok


def log_step(run, parts, progress, meter, loss_sum, n_valid, grad_norm, ok, dt, bar):
    if run.pp_reduce is not None:             # the loss lives on the last stage
        dist.broadcast(loss_sum, src=dist.get_global_rank(run.pp_group, run.cfg.pp - 1), group=run.pp_group)
    if run.dp_reduce is not None:
        dist.all_reduce(loss_sum, group=run.dp_group)
    progress.last_loss = float(loss_sum / n_valid.clamp(min=1))
    progress.step_times.append(dt)
    tps = meter.tokens_per_step / dt
    mfu = meter.mfu(tps, run.world)
    # on log steps only: one more pass over the weights (and a host sync on XLA)
    param_norm = float(global_param_norm(parts.params, run.tp_reduce, run.pp_reduce))
    if run.rank0:
        meter.logger.log(progress.step, loss=progress.last_loss, lr=parts.scheduler.get_last_lr()[0],
                         grad_norm=float(grad_norm), param_norm=param_norm, tokens_per_s=tps,
                         sequences_per_s=tps / run.cfg.seq_len, mfu=mfu, step_time_s=dt, skipped=int(not ok),
                         skipped_total=parts.guard.skipped, tokens=progress.tokens_seen)
        bar.set_postfix(loss=f"{progress.last_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.2f}%")


def save_checkpoint(run: Run, parts: Trainable, progress: Progress):
    cfg = run.cfg
    state = dict(model=parts.model.state_dict(), optimizer=parts.local_opt.state_dict(),
                 scheduler=parts.scheduler.state_dict(), loader=parts.loader.state_dict(),
                 nan_guard=parts.guard.state_dict(), rng=rng_state(), step=progress.step,
                 tokens_seen=progress.tokens_seen, param_names=optimizer_param_names(parts),
                 sr=dict(seed=cfg.seed, rule="bits of step s: sr_bits(sr_tensor_key(seed, s, stream, i)) for the "
                                                   "i-th tensor of a group; see precision.py"))
    meta = dict(identity=run.identity, config_hash=config_hash(run.identity), precision=cfg.precision, tp=cfg.tp,
                dp=run.dp, pp=cfg.pp, matmul_compute=run.plan.compute,
                hparams={k: getattr(cfg, k) for k in HPARAMS},
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    ckpt.save(run.out_dir, progress.step, state, meta, run.tp_rank, run.dp_rank, cfg.keep_last, pp_rank=run.pp_rank)


# ---------------------------------------------------------------------- phase 7: summary (rank 0)
def summarize(run: Run, parts: Trainable, progress: Progress, meter: Meter):
    cfg, times = run.cfg, progress.step_times
    wall = time.perf_counter() - meter.t_start
    steady = times[len(times) // 10 + 1:] or times
    mean_tps = meter.tokens_per_step / (sum(steady) / len(steady)) if steady else float("nan")
    mfu = meter.mfu(mean_tps, run.world)
    # A resume that finds the run already complete trains no step: there is no loss to report.
    final_loss = f"{progress.last_loss:.4f}" if progress.last_loss is not None else \
        "n/a (no step run by this invocation)"
    meter.logger.close()
    try:
        from training.plot import plot_runs
        plot_runs([run.out_dir], os.path.join(run.out_dir, "loss.png"), labels=[cfg.precision],
                  title=f"{cfg.model} {cfg.precision} loss")
    except Exception as e:                # the run's results stand without the picture
        print(f"train.py: warning: loss.png not written: {e}", file=sys.stderr)
    print(f"\ntrain.py summary\n  steps           {progress.step} (skipped by the NaN guard: {parts.guard.skipped})\n"
          f"  tokens          {progress.tokens_seen:,}\n  wall time       {wall:.1f} s\n"
          f"  tokens/s        {mean_tps:,.0f} (mean after the first {len(times) - len(steady)} logged "
          f"steps)\n  MFU             {100 * mfu:.2f}% ({meter.flops_per_token / 1e6:.2f} MFLOP/token; peak "
          f"{meter.peak.tflops:.3g} TFLOPS/device x {run.world}: {meter.peak.source})\n  final loss      {final_loss}\n"
          f"  last checkpoint step {progress.saved_at}\n  native kernels  {run.native}\n"
          f"  output          {run.out_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
