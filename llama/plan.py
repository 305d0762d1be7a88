"""Memory and layout planner for Llama 2 on trn1.32xlarge: ``python -m llama.plan --model llama2-70b --seq-len 4096
--nodes 4 [--global-batch-size 256]``.

For every (TP, PP, DP, activation checkpointing, ZeRO-1) layout that this project can run on the nodes, it
prints the bytes each NeuronCore holds at its peak (parameters, gradients, optimizer states, activations,
communication buffers and temporaries) against the core's 16 GiB of HBM, marks which fit, and ranks those by an
estimated step time. Nothing here is fitted to a measurement: every byte is counted from what this project's eager
PyTorch code keeps (``saved_tensors`` of each op, the optimizer's and the gradient all-reduce's buffers), and every
second from FLOPs and bytes over the documented peak rates.

Hardware (AWS Neuron docs):
- trn1.32xlarge: 16 Trainium chips = 32 NeuronCore-v2, 3,040 BF16 TFLOPS per instance (190 per chip, 95 per
  core), 512 GiB device memory (32 GiB per chip, 16 GiB per core), NeuronLink-v2 384 GiB/s per device, EFA 800
  Gbps per instance: https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trn1-arch.html
  and .../neuron-hardware/trainium.html.

Memory model (bytes per core, the most loaded pipeline stage; e = 2 for bf16 activations):
- parameters and gradients in the parameter dtype; AdamW's two moments in fp32 (8 B / parameter, divided by DP
  with ZeRO-1); the DP gradient all-reduce's flat fp32 buffer (``training.optim.allreduce_grads``: 4 B / parameter,
  plus the per-tensor fp32 copies for bf16 gradients) when DP > 1.
- activations per decoder layer and micro-batch (b sequences of s tokens, s_sp = s / tp with sequence
  parallelism), what autograd saves in ``llama.model`` under each kernel backend: the two norms' inputs
  (b s_sp h e) and rstd, the two normed inputs of the projections (b s h e, all-gathered under SP), q, k, v, the
  attention output twice (the kernel's [B, H, S, D] output and the o_proj input copy) and its log-sum-exp, and
  the MLP's gate, up and SwiGLU output (nki) or gate, up, silu(gate) and the product (reference autograd);
  "selective" keeps q, k, v, the o_proj input, gate and up; "full" keeps the layer input only, and a layer's
  full set is rebuilt once during the backward. During a layer's backward the loss's and final norm's saved
  tensors are freed and the embedding's gradient does not exist yet (it is made after layer 0).
- in-flight micro-batches: 1 without PP, stage s of 1F1B holds min(m, pp - s), GPipe holds all m, interleaved
  1F1B (v chunks) holds (v - 1) pp + 2 (pp - s - 1) + 1 chunk-micro-batches of 1/v of the stage's layers.

Step-time model (no overlap of compute and communication, an upper bound on the cost of each):
- compute: matmul FLOPs (6 N per token + attention, ``LlamaConfig.flops_per_token``; + one forward for "full" and
  the attention core's forward for "selective" recompute) of the stage / (95 TFLOPS per core).
- pipeline bubble: (m + pp - 1) / m for GPipe and 1F1B, (m + (pp - 1) / v) / m interleaved.
- TP: per layer and micro-batch, forward and backward, 2 all-gathers + 2 reduce-scatters (SP) or 2 all-reduces of
  b s h e bytes, ring cost (t - 1) / t of the size per step over NeuronLink (384 GiB/s per chip, shared by its
  2 cores); a TP group never spans nodes.
- DP: ring all-reduce of the fp32 gradients, 2 (d - 1) / d of the bytes: the cross-node part over EFA (800 Gbps =
  100 GB/s per instance shared by every DP group of the node), the in-node part over NeuronLink; ZeRO-1 adds the
  all-gather of the updated bf16 parameters.
- PP: each micro-batch's activation (b s_sp h e) forward and its gradient backward per stage boundary, over EFA when
  stages are on different nodes.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys

from llama.config import LlamaConfig

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    cores_per_node: int
    hbm_per_core: int                 # bytes
    peak_flops_per_core: float        # bf16 FLOP/s
    link_bytes_per_core: float        # NeuronLink bytes/s per core
    efa_bytes_per_node: float         # bytes/s


# 190 TFLOPS per chip / 2 cores; 384 GiB/s NeuronLink-v2 per chip / 2 cores; 800 Gbps EFA; 32 GiB per chip / 2 cores.
TRN1 = Hardware("trn1.32xlarge", 32, 16 * GiB, 95e12, 384 * GiB / 2, 800e9 / 8)


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ac: str = "selective"             # none | selective | full
    zero1: bool = True
    micro_batch: int = 1
    accum: int = 1                    # micro-batches per step per DP rank (= the pipeline's micro-batches)
    schedule: str = "1f1b"            # gpipe | 1f1b | interleaved
    virtual: int = 1

    @property
    def sp(self) -> bool:
        return self.tp > 1            # sequence parallelism whenever TP > 1 (the recipes' choice)


@dataclasses.dataclass
class Memory:
    """Bytes on one core. ``total`` is the peak: params + optimizer + the largest of the step's phases (forward
    end, loss backward, each layer's backward, gradient all-reduce / optimizer step); the other fields are the
    parts (``temporaries``: the short-lived buffers of the phase that sets the peak, ``phase``: its name)."""
    params: int
    grads: int
    optimizer: int
    activations: int
    comm: int
    temporaries: int
    total: int
    phase: str


def _ceil_div(a, b):
    return -(-a // b)


def _kv_local(cfg, tp):
    """KV features per rank: num_kv_heads / tp heads, or one replicated head when tp > num_kv_heads."""
    return cfg.head_dim * max(1, cfg.num_kv_heads // tp)


def layer_activation_bytes(cfg: LlamaConfig, b: int, s: int, tp: int, sp: bool, ac: str, e: int,
                           backend: str = "nki") -> int:
    """Bytes one decoder layer keeps for the backward, for one micro-batch (see the module docstring)."""
    h, f, nh = cfg.hidden_size, cfg.intermediate_size // tp, cfg.num_heads // tp
    s_sp = s // tp if sp else s
    kv = _kv_local(cfg, tp)
    resid = b * s_sp * h * e
    if ac == "full":
        return resid
    norms = 2 * resid + 2 * b * s_sp * 4                      # inputs + fp32 rstd
    normed = 2 * b * s * h * e                                 # the projections' inputs (gathered under SP)
    q, kvb, o_in = b * s * nh * cfg.head_dim * e, 2 * b * s * kv * e, b * s * nh * cfg.head_dim * e
    mlp_elem = b * s * f
    if ac == "selective":
        return norms + normed + q + kvb + o_in + 2 * mlp_elem * e
    if ac != "none":
        raise ValueError(f"layer_activation_bytes: ac must be none, selective or full, got {ac!r}")
    # attention kernel keeps q_rot, k_rot, v, its output and lse [B, H, S] fp32; o_proj keeps its input copy
    attn = q + kvb + q + b * nh * s * 4 + o_in
    if backend == "reference" and e == 4:
        mlp = 4 * mlp_elem * e                                 # autograd of silu(g) * u: g, u, silu(g); down input
    elif backend == "nki":
        mlp = 3 * mlp_elem * e                                 # swiglu op keeps g, u; down keeps its input
    else:
        raise ValueError(f"layer_activation_bytes: backend {backend!r} with {e}-byte activations is not modelled "
                         f"(nki any dtype, reference fp32)")
    return norms + normed + attn + mlp


def stage_layers(cfg: LlamaConfig, pp: int, virtual: int = 1) -> list[int]:
    """Decoder layers per rank of the PP group (its virtual stages summed), the 'params' split of llama.pipeline."""
    return list(_stage_layers(dataclasses.astuple(cfg), pp, virtual))


@functools.lru_cache(maxsize=None)
def _stage_layers(cfg_tuple, pp, virtual):
    from llama.pipeline import split_layers
    ranges = split_layers(LlamaConfig(*cfg_tuple), pp * virtual, "params")
    return tuple(sum(len(ranges[r + k * pp]) for k in range(virtual)) for r in range(pp))


def stage_params(cfg: LlamaConfig, tp: int, pp: int, rank: int, n_layers: int) -> int:
    """Parameters held by one core of PP rank ``rank`` (TP shards; norm weights replicated)."""
    h = cfg.hidden_size
    per_layer = (2 * h * h + 3 * h * cfg.intermediate_size) // tp + 2 * h * _kv_local(cfg, tp) + 2 * h
    n = n_layers * per_layer
    vocab_local = _ceil_div(cfg.vocab_size, tp)
    if rank == 0:
        n += vocab_local * h
    if rank == pp - 1:
        n += h + (0 if cfg.tie_word_embeddings and pp == 1 else vocab_local * h)
    return n


def in_flight(layout: Layout, rank: int) -> float:
    """Micro-batches (in units of the whole stage's layers) whose activations rank ``rank`` holds at its peak."""
    m, pp = layout.accum, layout.pp
    if pp == 1:
        return 1
    if layout.schedule == "gpipe":
        return m
    if layout.schedule == "1f1b":
        return min(m, pp - rank)
    v = layout.virtual
    return min(m * v, (v - 1) * pp + 2 * (pp - rank - 1) + 1) / v


def stage_memory(cfg: LlamaConfig, layout: Layout, seq: int, rank: int, precision: str = "bf16-sr",
                 backend: str = "nki") -> Memory:
    """Peak bytes on one core of PP rank ``rank`` for this layout (see the module docstring)."""
    tp, pp, dp, b = layout.tp, layout.pp, layout.dp, layout.micro_batch
    pe = 2 if precision == "bf16-sr" else 4                   # parameter (and gradient) bytes
    e = 2 if precision == "bf16-sr" else 4                    # residual stream (fp32 under "mixed" autocast)
    n_layers = stage_layers(cfg, pp, layout.virtual)[rank]
    p = stage_params(cfg, tp, pp, rank, n_layers)
    h, f, v_local = cfg.hidden_size, cfg.intermediate_size // tp, _ceil_div(cfg.vocab_size, tp)
    n = b * seq
    s_sp = seq // tp if layout.sp else seq
    last = rank == pp - 1
    saved = layer_activation_bytes(cfg, b, seq, tp, layout.sp, layout.ac, e, backend)
    rebuilt = layer_activation_bytes(cfg, b, seq, tp, layout.sp, "none", e, backend) if layout.ac == "full" else 0
    per_mb = n_layers * saved + 2 * seq * cfg.head_dim * e    # + the rotary cos/sin tables (shared by the layers)
    head_grad = 0
    if rank == 0:
        per_mb += b * seq * 8                                  # token ids kept by the embedding
        head_grad += v_local * h * pe
    loss_fwd = loss_bwd = 0
    tail = 0                                                   # the last stage's saved tensors after the layers
    lm_grad = 0
    if last:
        tail += b * s_sp * h * e + b * s_sp * 4                # final norm input + rstd
        lm_grad = v_local * h * pe
        head_grad += lm_grad
        if tp == 1:                                            # fused loss: dHidden and fp32 dWeight from the forward
            tail += n * h * e + v_local * h * 4
            rows = math.ceil(n / math.ceil(n / max(1, min(n, (1 << 23) // v_local))))
            loss_fwd = rows * v_local * 4 + h * v_local * e    # logits chunk buffer (fp32) + contiguous W^T
            loss_bwd = n * h * e + v_local * h * 4             # dHidden * g, dWeight * g
        else:                                                  # vocab-parallel loss: normed input, fp32 softmax
            tail += n * h * e + n * v_local * 4
            loss_fwd = n * v_local * e
            loss_bwd = n * v_local * 4 + n * h * e
    per_mb += tail
    acts = int(in_flight(layout, rank) * per_mb)
    layer_grad = (p * pe - head_grad) // max(1, n_layers)
    # gradients exist from the first backward of a step on: with several micro-batches they are all allocated while
    # later micro-batches run; with one, they appear layer by layer during the backward
    persist = layout.accum > 1
    g_base = p * pe if persist else head_grad
    # inside one layer's backward: the incoming gradient and the MLP's three f-wide gradients (dgate, dup, d(out))
    inner = n * (3 * f + 2 * h) * e
    phases = {"forward": acts + loss_fwd + (p * pe if persist else 0),
              "loss backward": acts + loss_bwd + g_base}
    worst = max(range(max(1, n_layers)), key=lambda i: rebuilt + inner - (i + 1) * saved
                + (0 if persist else (i + 1) * layer_grad))
    i = worst
    # the micro-batch in its layer backward has passed the loss and final norm backward (its tail is freed, the
    # fused loss's dWeight became the LM head's gradient); the embedding's gradient appears only after layer 0
    phases["layer backward"] = (acts - (i + 1) * saved - tail + rebuilt + inner
                                + (p * pe if persist else lm_grad + (i + 1) * layer_grad))
    comm = (4 * p + (4 * p if pe == 2 else 0)) if dp > 1 else 0   # flat fp32 buffer (+ fp32 copies of bf16 grads)
    opt_tmp = 4 * p if precision != "bf16-sr" else 0           # torch AdamW foreach: a list of sqrt(v)
    phases["gradient sync / optimizer"] = p * pe + max(comm, opt_tmp)
    states = 8 * p // (dp if layout.zero1 else 1)
    phase = max(phases, key=phases.get)
    temps = {"forward": loss_fwd, "loss backward": loss_bwd, "layer backward": rebuilt + inner}.get(phase, 0)
    return Memory(params=p * pe, grads=p * pe, optimizer=states, activations=acts, comm=max(comm, opt_tmp),
                  temporaries=temps, total=p * pe + states + phases[phase], phase=phase)


def peak_memory(cfg, layout, seq, precision="bf16-sr", backend="nki"):
    """(Memory, rank) of the most loaded core."""
    mems = [(stage_memory(cfg, layout, seq, r, precision, backend), r) for r in range(layout.pp)]
    return max(mems, key=lambda x: x[0].total)


# --------------------------------------------------------------------------- step time

def step_time(cfg: LlamaConfig, layout: Layout, seq: int, hw: Hardware = TRN1) -> dict:
    """Seconds per optimizer step, by part (see the module docstring)."""
    tp, pp, dp, b, m = layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.accum
    e = 2
    tokens = b * seq
    fwd = cfg.flops_per_token(seq) / 3                         # forward FLOPs per token
    attn_fwd = 2 * cfg.num_layers * cfg.hidden_size * 2 * seq  # QK^T and PV forward per token
    recompute = fwd if layout.ac == "full" else attn_fwd if layout.ac == "selective" else 0.0
    layers = stage_layers(cfg, pp, layout.virtual)
    share = max(layers) / cfg.num_layers                       # the slowest stage sets the pace
    flops_mb = (cfg.flops_per_token(seq) + recompute) * tokens * share / tp
    compute_mb = flops_mb / hw.peak_flops_per_core
    act = tokens * cfg.hidden_size * e
    ring = (tp - 1) / tp
    n_coll = (8 if layout.ac != "full" else 12) if tp > 1 else 0   # AG/RS (or AR halves) fwd + bwd (+ recompute)
    tp_mb = max(layers) * n_coll * act * ring / hw.link_bytes_per_core
    pp_mb = 0.0
    if pp > 1:
        cross = tp * dp >= hw.cores_per_node                   # a stage fills whole nodes: boundaries cross EFA
        bw = hw.efa_bytes_per_node / (hw.cores_per_node if cross else 1) if cross else hw.link_bytes_per_core
        pp_mb = 2 * (act // (tp if layout.sp else 1)) / bw
    per_mb = compute_mb + tp_mb + pp_mb
    slots = m + (pp - 1) / (layout.virtual if layout.schedule == "interleaved" else 1)
    pipeline = slots * per_mb
    p = max(stage_params(cfg, tp, pp, r, layers[r]) for r in range(pp))
    dp_s = _dp_time(p, dp, tp, pp, layout.zero1, hw)
    return dict(compute=m * compute_mb, bubble=pipeline - m * per_mb, tp_comm=m * tp_mb, pp_comm=m * pp_mb,
                dp_comm=dp_s, total=pipeline + dp_s)


def _dp_time(p, dp, tp, pp, zero1, hw):
    if dp == 1:
        return 0.0
    per_node = max(1, hw.cores_per_node // (tp * pp)) if tp * pp < hw.cores_per_node else 1
    k = min(dp, per_node)                                      # DP ranks of one group on one node
    n_nodes = dp // k
    grad = 4 * p                                               # fp32 gradient all-reduce
    gather = 2 * p if zero1 else 0                             # ZeRO-1: all-gather of the bf16 parameters
    t = 0.0
    if k > 1:
        t += (2 * (k - 1) / k * grad + (k - 1) / k * gather) / hw.link_bytes_per_core
    if n_nodes > 1:
        groups_per_node = hw.cores_per_node // k               # every core of the node is in one DP group
        vol = groups_per_node * (2 * (n_nodes - 1) / n_nodes * grad / k + (n_nodes - 1) / n_nodes * gather / k)
        t += vol / hw.efa_bytes_per_node
    return t


# --------------------------------------------------------------------------- enumeration and printing

def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: LlamaConfig, nodes: int, global_batch: int, micro_batch: int = 1, hw: Hardware = TRN1):
    """Every runnable (tp, pp, dp, ac, zero1) on ``nodes`` nodes: TP within a node and accepted by
    ``llama.parallel.plan``, pp <= num_layers, global batch divisible by micro x dp, 1F1B with >= pp micro-batches."""
    from llama.parallel import ParallelError, plan
    world = nodes * hw.cores_per_node
    for tp in _divisors(hw.cores_per_node):
        try:
            plan(cfg, tp, pad_vocab_to_multiple_of=None if cfg.vocab_size % tp == 0 else 1)
        except ParallelError:
            continue
        for pp in _divisors(world // tp):
            if pp > cfg.num_layers:
                continue
            dp = world // (tp * pp)
            if global_batch % (micro_batch * dp):
                continue
            accum = global_batch // (micro_batch * dp)
            if pp > 1 and accum < pp:
                continue
            for ac in ("none", "selective", "full"):
                for zero1 in ((False, True) if dp > 1 else (False,)):
                    yield Layout(tp, pp, dp, ac, zero1, micro_batch, accum)


def table(cfg, seq, nodes, global_batch, micro_batch=1, precision="bf16-sr", hw=TRN1, top=None):
    """Rows (layout, Memory, rank, times, fits) sorted: fitting layouts by step time, then the others by memory."""
    rows = []
    for lay in layouts(cfg, nodes, global_batch, micro_batch, hw):
        mem, rank = peak_memory(cfg, lay, seq, precision)
        rows.append((lay, mem, rank, step_time(cfg, lay, seq, hw), mem.total <= hw.hbm_per_core))
    rows.sort(key=lambda r: (not r[4], r[3]["total"] if r[4] else r[1].total))
    return rows[:top] if top else rows


def _gib(x):
    return f"{x / GiB:6.2f}"


def format_table(rows, global_batch, hw=TRN1) -> str:
    head = (f"{'tp':>3} {'pp':>3} {'dp':>4} {'ac':>9} {'zero1':>5} {'m':>4} | {'params':>6} {'grads':>6} {'optim':>6} "
            f"{'acts':>6} {'comm':>6} {'temp':>6} {'total':>6} GiB/core | fits | {'step s':>7} {'bubble':>6} "
            f"{'tp s':>6} {'dp s':>6} | seq/s")
    lines = [head, "-" * len(head)]
    for lay, mem, rank, t, fits in rows:
        lines.append(f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.ac:>9} {str(lay.zero1):>5} {lay.accum:>4} | "
                     f"{_gib(mem.params)} {_gib(mem.grads)} {_gib(mem.optimizer)} {_gib(mem.activations)} "
                     f"{_gib(mem.comm)} {_gib(mem.temporaries)} {_gib(mem.total)}          | "
                     f"{'yes ' if fits else 'NO  '} | {t['total']:7.2f} {t['bubble']:6.2f} {t['tp_comm']:6.2f} "
                     f"{t['dp_comm']:6.2f} | {global_batch / t['total']:6.2f}")
    return "\n".join(lines)


SEED_PUBLISHED = {1: 3.7, 2: 7.4, 4: 14.6}    # seq/s, 7B, seq 4096, TP 8 (shared/docs/field-notes.md: the blog)


def seed_comparison(seq=4096, global_batch=256, hw=TRN1) -> str:
    """The seed's 7B run (TP 8 x DP 4 per node, selective recompute, ZeRO-1, micro-batch 1) predicted beside the
    published throughput. The prediction is an ideal bound (TensorE peak, no overlap, no kernel inefficiency);
    the ratio is the efficiency the published runs reached against it."""
    cfg = LlamaConfig.preset("llama2-7b")
    lines = [f"{'nodes':>5} {'layout':>16} {'predicted seq/s':>16} {'published':>10} {'published/predicted':>20} "
             f"{'GiB/core':>9}"]
    for nodes, pub in SEED_PUBLISHED.items():
        dp = 4 * nodes
        lay = Layout(8, 1, dp, "selective", True, 1, global_batch // dp)
        t = step_time(cfg, lay, seq, hw)
        mem, _ = peak_memory(cfg, lay, seq)
        pred = global_batch / t["total"]
        lines.append(f"{nodes:>5} {'TP8 PP1 DP' + str(dp):>16} {pred:16.2f} {pub:10.1f} {pub / pred:20.2f} "
                     f"{mem.total / GiB:9.2f}")
    return "\n".join(lines)


ASSUMPTIONS = """assumptions: bf16 parameters, gradients and activations, fp32 AdamW moments (bf16-sr recipe);
micro-batch 1; sequence parallelism whenever TP > 1; 1F1B pipeline; the NKI kernels' saved tensors; eager-PyTorch
buffers (XLA may fuse or rematerialise differently); compute at 95 TFLOPS per core with no kernel inefficiency;
communication not overlapped with compute, ring collectives at the documented link rates, no latency term; 16 GiB
per core with no reserve for the Neuron runtime, compiled graphs or collectives' scratch space."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama2-70b", help="LlamaConfig preset")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--nodes", type=int, default=1, help="trn1.32xlarge instances (32 NeuronCores each)")
    p.add_argument("--global-batch-size", type=int, default=256, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--top", type=int, default=0, help="print only the first N rows (0: all)")
    p.add_argument("--seed-comparison", action="store_true", help="the seed's 7B runs beside their published figures")
    a = p.parse_args(argv)
    try:
        cfg = LlamaConfig.preset(a.model)
    except ValueError as e:
        p.error(str(e))
    if a.nodes < 1 or a.seq_len < 1 or a.global_batch_size < 1 or a.micro_batch_size < 1:
        p.error("--nodes, --seq-len, --global-batch-size and --micro-batch-size must be >= 1")
    rows = table(cfg, a.seq_len, a.nodes, a.global_batch_size, a.micro_batch_size)
    n_fit, n_all = sum(r[4] for r in rows), len(rows)
    rows = rows[:a.top] if a.top else rows
    print(f"{a.model} ({cfg.num_params() / 1e9:.2f}B params), seq {a.seq_len}, global batch {a.global_batch_size}, "
          f"{a.nodes} x {TRN1.name} = {a.nodes * TRN1.cores_per_node} NeuronCores of {TRN1.hbm_per_core / GiB:.0f} "
          f"GiB; {n_fit} of {n_all} layouts fit (m = micro-batches per step per pipeline)")
    print(format_table(rows, a.global_batch_size))
    print(ASSUMPTIONS)
    if a.seed_comparison:
        print("\nseed configuration (llama2-7b, seq 4096, global batch 256):")
        print(seed_comparison(a.seq_len, a.global_batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
