"""Tensor parallelism (Megatron-style) applied to a ``llama.Llama`` from outside, over plain torch.distributed.

``parallelize(model, tp_group)`` shards the model in place; ``model.py`` has no parallel branch. What it does:

- q/k/v and gate/up become column-parallel (output features split: whole heads / FFN columns per rank);
  o and down become row-parallel (input features split) and their outputs are summed over the TP group.
- KV heads: with tp <= num_kv_heads each rank holds num_kv_heads / tp heads. With tp > num_kv_heads
  (tp % num_kv_heads == 0) the KV heads are *replicated*: rank r holds KV head r // (tp / num_kv_heads),
  which is the KV head of all its local query heads. Each copy only sees the gradient of its own query
  heads, so the K/V weight gradients are summed over the copies of each head inside autograd.
- The embedding and the LM head are split over the vocabulary; the loss becomes a vocab-parallel
  cross-entropy that honours ignore_index=-100 (ignored tokens give 0 loss and 0 gradient).
- The TP region is entered right after each RMSNorm (a forward hook on the norm): without sequence
  parallelism that is identity forward / all-reduce backward; with sequence parallelism the norms (and
  the residual stream) hold a 1/tp slice of the sequence and the region entry is an all-gather over the
  sequence (reduce-scatter backward). Row-parallel outputs leave the region with an all-reduce, or with
  sequence parallelism a reduce-scatter over the sequence (all-gather backward).

Collectives are ``all_reduce``, ``all_gather`` (list form) and ``reduce_scatter`` (list form), which gloo,
nccl and xla implement. Where a backend lacks reduce_scatter, ``_reduce_scatter`` falls back to all_reduce
followed by taking this rank's slice (same result, tp times the traffic), chosen once per process.

Vocabulary not divisible by tp: an error, unless ``pad_vocab_to_multiple_of`` is given; then the vocabulary
is padded to a multiple of ``pad_vocab_to_multiple_of * tp`` (Megatron's rule). Padded embedding rows are
zero and never looked up; padded LM-head columns get logit -inf in the loss (excluded from the softmax)
and are stripped from gathered logits and by ``to_hf``.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama.config import LlamaConfig
from llama.model import IGNORE_INDEX, Llama


class ParallelError(ValueError):
    """A tensor-parallel degree or layout that cannot be applied; the message names the degree and the rule."""


# --------------------------------------------------------------------------- process groups

def make_groups(tp_size: int, pp_size: int | None = None):
    """(tp_group, dp_group) for this rank, after ``dist.init_process_group``; with ``pp_size`` given,
    (tp_group, pp_group, dp_group).

    Rank layout: rank = (pp_rank * dp + dp_rank) * tp + tp_rank. TP groups are blocks of consecutive ranks (on one
    trn1 node: its NeuronCores), DP groups the ranks of one pipeline stage with equal TP rank, PP groups the ranks
    with equal (dp_rank, tp_rank): a stage holds tp * dp consecutive ranks, so stages can be whole nodes and only
    the pipeline's point-to-point activations cross EFA. Every rank creates every group in the same order, as
    ``dist.new_group`` requires.
    """
    if not dist.is_initialized():
        raise RuntimeError("llama.parallel.make_groups: call torch.distributed.init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    pp = 1 if pp_size is None else pp_size
    if tp_size < 1 or pp < 1 or world % (tp_size * pp):
        raise ParallelError(f"make_groups: tp_size {tp_size} x pp_size {pp} = {tp_size * pp} must divide the "
                            f"world size {world} (world = tp x pp x dp)")
    dp = world // (tp_size * pp)

    def mine(all_ranks):
        found = None
        for ranks in all_ranks:
            g = dist.new_group(ranks)
            if rank in ranks:
                found = g
        return found

    tp_group = mine([list(range(i * tp_size, (i + 1) * tp_size)) for i in range(world // tp_size)])
    dp_group = mine([[(s * dp + d) * tp_size + t for d in range(dp)] for s in range(pp) for t in range(tp_size)])
    if pp_size is None:
        return tp_group, dp_group
    pp_group = mine([[(s * dp + d) * tp_size + t for s in range(pp)] for d in range(dp) for t in range(tp_size)])
    return tp_group, pp_group, dp_group


def layout_ranks(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, pp_rank, dp_rank) of a global rank in ``make_groups``' layout."""
    return rank % tp, rank // (tp * dp), rank // tp % dp


def _size_rank(group):
    return dist.get_world_size(group), dist.get_rank(group)


# --------------------------------------------------------------------------- collectives with autograd

_RS_FALLBACK = None   # None: not probed yet; True: backend lacks reduce_scatter, use all_reduce + slice


def _all_gather(x, dim, group):
    tp, _ = _size_rank(group)
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, dim, group):
    global _RS_FALLBACK
    tp, rank = _size_rank(group)
    chunks = [c.contiguous() for c in x.chunk(tp, dim=dim)]
    if not _RS_FALLBACK:
        out = torch.empty_like(chunks[0])
        try:
            dist.reduce_scatter(out, chunks, group=group)
            _RS_FALLBACK = False
            return out
        except (RuntimeError, NotImplementedError):
            if _RS_FALLBACK is False:
                raise
            _RS_FALLBACK = True
    full = x.contiguous().clone()
    dist.all_reduce(full, group=group)
    return full.chunk(tp, dim=dim)[rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Forward identity, backward all-reduce: a replicated activation entering column-parallel linears."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce (sum of partial results), backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    """Forward all-gather over dim 1 (sequence), backward reduce-scatter over it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, 1, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Forward reduce-scatter over dim 1 (sequence), backward all-gather over it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


class _GatherVocab(torch.autograd.Function):
    """Forward all-gather of vocab shards over the last dim, backward this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        tp, rank = _size_rank(group)
        ctx.rank, ctx.n = rank, x.shape[-1]
        return _all_gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(-1, ctx.rank * ctx.n, ctx.n).contiguous(), None


class _SumGradOverReplicas(torch.autograd.Function):
    """Forward identity on a replicated K/V weight; backward sums its gradient over the ranks holding the
    same KV head. Done with one all-reduce over the whole TP group of a [num_kv_heads, ...] buffer in which
    each rank fills only its head's slot (no sub-groups needed, which keeps the DP x TP group set-up simple;
    K/V weights are small)."""

    @staticmethod
    def forward(ctx, w, group, slot, n_slots):
        ctx.group, ctx.slot, ctx.n_slots = group, slot, n_slots
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        buf = g.new_zeros((ctx.n_slots,) + tuple(g.shape))
        buf[ctx.slot] = g
        dist.all_reduce(buf, group=ctx.group)
        return buf[ctx.slot].clone(), None, None, None


# --------------------------------------------------------------------------- sharding plan

@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one parameter is laid out over the TP group.

    dim None: replicated on every rank. Otherwise the tensor is split along ``dim`` into tp // replicas
    equal shards of the (padded) length ``padded``; rank r holds shard r // replicas, rows beyond ``full``
    (vocabulary padding) are zeros.
    """
    dim: int | None
    full: int = 0
    padded: int = 0
    replicas: int = 1

    def local_range(self, rank: int, tp: int):
        """(start, stop, local_len): rows [start, stop) of the unpadded tensor, padded with zeros to local_len."""
        n = tp // self.replicas
        local = self.padded // n
        start = (rank // self.replicas) * local
        return min(start, self.full), min(start + local, self.full), local


def padded_vocab(vocab_size: int, tp: int, pad_vocab_to_multiple_of=None) -> int:
    if pad_vocab_to_multiple_of is None:
        if vocab_size % tp:
            raise ParallelError(f"tensor parallelism: vocab_size {vocab_size} is not divisible by the TP degree "
                                f"{tp}; pass pad_vocab_to_multiple_of (e.g. 8) to pad the vocabulary")
        return vocab_size
    m = int(pad_vocab_to_multiple_of) * tp
    if m < 1:
        raise ParallelError(f"pad_vocab_to_multiple_of must be >= 1, got {pad_vocab_to_multiple_of}")
    return -(-vocab_size // m) * m


def plan(cfg: LlamaConfig, tp: int, pad_vocab_to_multiple_of=None) -> dict:
    """{parameter name: ShardSpec} for TP degree tp; ParallelError naming the degree and rule when impossible."""
    if tp < 1:
        raise ParallelError(f"TP degree must be >= 1, got {tp}")
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if nh % tp:
        raise ParallelError(f"TP degree {tp} does not divide num_heads {nh}")
    if cfg.intermediate_size % tp:
        raise ParallelError(f"TP degree {tp} does not divide intermediate_size {cfg.intermediate_size}")
    if nkv % tp == 0:
        kv = ShardSpec(0, nkv * d, nkv * d, 1)
    elif tp % nkv == 0:
        kv = ShardSpec(0, nkv * d, nkv * d, tp // nkv)          # KV-head replication
    else:
        raise ParallelError(f"TP degree {tp} neither divides num_kv_heads {nkv} nor is a multiple of it "
                            f"(KV-head replication needs tp % num_kv_heads == 0)")
    v = cfg.vocab_size
    vp = padded_vocab(v, tp, pad_vocab_to_multiple_of)
    f = cfg.intermediate_size
    specs = {"embed_tokens.weight": ShardSpec(0, v, vp), "norm.weight": ShardSpec(None)}
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = ShardSpec(0, v, vp)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        specs.update({
            p + "input_layernorm.weight": ShardSpec(None),
            p + "post_attention_layernorm.weight": ShardSpec(None),
            p + "self_attn.q_proj.weight": ShardSpec(0, nh * d, nh * d),
            p + "self_attn.k_proj.weight": kv,
            p + "self_attn.v_proj.weight": kv,
            p + "self_attn.o_proj.weight": ShardSpec(1, nh * d, nh * d),
            p + "mlp.gate_proj.weight": ShardSpec(0, f, f),
            p + "mlp.up_proj.weight": ShardSpec(0, f, f),
            p + "mlp.down_proj.weight": ShardSpec(1, f, f),
        })
    return specs


def shard_tensor(full: torch.Tensor, spec: ShardSpec, rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of a full tensor (zero-padded where the spec pads)."""
    if spec.dim is None:
        return full.clone()
    start, stop, local = spec.local_range(rank, tp)
    part = full.narrow(spec.dim, start, stop - start)
    if stop - start < local:
        shape = list(part.shape)
        shape[spec.dim] = local - (stop - start)
        part = torch.cat([part, part.new_zeros(shape)], dim=spec.dim)
    return part.contiguous()


def gather_tensor(local: torch.Tensor, spec: ShardSpec, group) -> torch.Tensor:
    """The full (unpadded) tensor from every rank's shard; a collective every TP rank must call."""
    if spec.dim is None or group is None:
        return local.detach().clone()
    tp, _ = _size_rank(group)
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    full = torch.cat(parts[::spec.replicas], dim=spec.dim)
    return full.narrow(spec.dim, 0, spec.full).contiguous()


# --------------------------------------------------------------------------- parallel modules

@dataclasses.dataclass
class TPState:
    group: object
    tp: int
    rank: int
    sequence_parallel: bool
    specs: dict
    padded_vocab: int


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_start + local) on this rank; ids outside give 0, then the partial
    results are summed over TP (all-reduce), or reduce-scattered over the sequence with SP."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group, sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            tp, _ = _size_rank(self.group)
            if ids.shape[1] % tp:
                raise ParallelError(f"sequence parallelism: sequence length {ids.shape[1]} (input_ids "
                                    f"{tuple(ids.shape)}) is not divisible by the TP degree {tp}")
            return _ReduceScatterSeq.apply(out, self.group)
        return _ReduceFromTP.apply(out, self.group)


class KVReplicatedLinear(nn.Linear):
    """A K or V projection holding one replicated KV head; its weight gradient is summed over the copies."""

    def setup(self, group, slot, n_slots):
        self.group, self.slot, self.n_slots = group, slot, n_slots
        return self

    def forward(self, x):
        return F.linear(x, _SumGradOverReplicas.apply(self.weight, self.group, self.slot, self.n_slots))


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits [N, V_local]; fp32 inside.

    loss_t = log(sum_v exp(z_v - m)) - (z_target - m) with m the global max (all-reduce MAX), the sum of
    exponentials and the target logit each all-reduced (SUM; only the rank holding the target contributes
    it). Tokens with label == ignore_index get loss 0 and gradient 0; padded vocabulary columns
    (>= n_real) get logit -inf. Backward: (softmax - onehot) * dloss_t, no collective needed.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, n_real, group, ignore_index):
        z = logits.float() - 0.0        # a new fp32 buffer (never the caller's logits)
        if n_real < z.shape[-1]:
            z[:, n_real:] = float("-inf")
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z.sub_(m.unsqueeze(-1))
        valid = labels != ignore_index
        local = labels - vocab_start
        here = valid & (local >= 0) & (local < n_real)
        idx = local.masked_fill(~here, 0)
        target = z.gather(1, idx.unsqueeze(1)).squeeze(1).masked_fill(~here, 0.0)
        dist.all_reduce(target, group=group)
        z.exp_()                                       # z now holds exp(z - m)
        sumexp = z.sum(dim=-1)
        dist.all_reduce(sumexp, group=group)
        loss = (torch.log(sumexp) - target).masked_fill(~valid, 0.0)
        z.div_(sumexp.unsqueeze(-1))                   # softmax, kept for the backward
        ctx.save_for_backward(z, idx, here, valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        p, idx, here, valid = ctx.saved_tensors
        grad = p.clone()
        grad.scatter_add_(1, idx.unsqueeze(1), -here.to(grad.dtype).unsqueeze(1))
        grad.mul_((g.float() * valid).unsqueeze(1))
        return grad.to(ctx.dtype), None, None, None, None, None


class VocabParallelCrossEntropy(nn.Module):
    """Drop-in for ``loss.LinearCrossEntropy`` with a vocab-sharded LM head weight: local logits = the
    hidden states (already entered into the TP region) times this rank's rows, then ``_VocabParallelCE``."""

    ignore_index = IGNORE_INDEX

    def __init__(self, group, vocab_start: int, n_real: int):
        super().__init__()
        self.group, self.vocab_start, self.n_real = group, vocab_start, n_real

    def forward(self, hidden, weight, labels, reduction="mean"):
        logits = F.linear(hidden, weight)
        v = logits.shape[-1]
        flat_labels = labels.reshape(-1)
        per_token = _VocabParallelCE.apply(logits.reshape(-1, v), flat_labels, self.vocab_start, self.n_real,
                                           self.group, self.ignore_index)
        total = per_token.sum()
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / (flat_labels != self.ignore_index).sum()
        if reduction == "none":
            return per_token.view(labels.shape)
        raise ValueError(f"VocabParallelCrossEntropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class GatherLogits(nn.Module):
    """Vocab-sharded logits -> full logits [..., vocab_size] (padding columns stripped)."""

    def __init__(self, group, vocab_size: int):
        super().__init__()
        self.group, self.vocab_size = group, vocab_size

    def forward(self, logits):
        full = _GatherVocab.apply(logits, self.group)
        return full[..., :self.vocab_size] if full.shape[-1] != self.vocab_size else full


def _enter_hook(group, sequence_parallel):
    """Forward hook for a norm: its output enters the TP region (copy or sequence all-gather)."""
    fn = _GatherSeq if sequence_parallel else _CopyToTP
    return lambda module, inputs, out: fn.apply(out, group)


def _exit_hook(group, sequence_parallel):
    """Forward hook for a row-parallel linear: sum of partial outputs (all-reduce or sequence reduce-scatter)."""
    fn = _ReduceScatterSeq if sequence_parallel else _ReduceFromTP
    return lambda module, inputs, out: fn.apply(out, group)


def _set_param(module: nn.Module, name: str, tensor: torch.Tensor):
    setattr(module, name, nn.Parameter(tensor, requires_grad=getattr(module, name).requires_grad))


def parallelize(model: Llama, tp_group, sequence_parallel: bool = False, pad_vocab_to_multiple_of=None) -> Llama:
    """Shard ``model`` in place over ``tp_group`` (a torch.distributed group); returns the model.

    Every rank must call it with a model holding the same full weights (same seed, or the same checkpoint;
    ``llama.from_hf`` instead reads only each rank's slices). Raises ParallelError, before touching the
    model, when the TP degree cannot be applied to the config. Parameters are replaced by their shards:
    build optimizers afterwards.
    """
    if getattr(model, "_tp", None) is not None:
        raise ParallelError("parallelize: the model is already parallelized")
    cfg = model.config
    tp, rank = _size_rank(tp_group)
    specs = plan(cfg, tp, pad_vocab_to_multiple_of)
    vp = padded_vocab(cfg.vocab_size, tp, pad_vocab_to_multiple_of)
    named = dict(model.named_parameters())
    for name, spec in specs.items():
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        _set_param(module, pname, shard_tensor(named[name].detach(), spec, rank, tp))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    vocab_start, _, vocab_local = specs["embed_tokens.weight"].local_range(rank, tp)
    n_real = max(0, min(vocab_local, cfg.vocab_size - vocab_start))
    emb = VocabParallelEmbedding(model.embed_tokens.weight, vocab_start, tp_group, sequence_parallel)
    model.embed_tokens = emb
    if cfg.tie_word_embeddings:
        model.lm_head.weight = emb.weight
    model.lm_head.out_features = vocab_local
    model.loss_fn = VocabParallelCrossEntropy(tp_group, vocab_start, n_real)
    model.logits_out = GatherLogits(tp_group, cfg.vocab_size)
    model.norm.register_forward_hook(_enter_hook(tp_group, sequence_parallel))

    kv_spec = specs["layers.0.self_attn.k_proj.weight"] if cfg.num_layers else None
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm.register_forward_hook(_enter_hook(tp_group, sequence_parallel))
        layer.post_attention_layernorm.register_forward_hook(_enter_hook(tp_group, sequence_parallel))
        attn.o_proj.register_forward_hook(_exit_hook(tp_group, sequence_parallel))
        mlp.down_proj.register_forward_hook(_exit_hook(tp_group, sequence_parallel))
        if kv_spec.replicas > 1:
            for proj in ("k_proj", "v_proj"):
                old = getattr(attn, proj)
                new = KVReplicatedLinear(old.in_features, old.weight.shape[0], bias=False, device="meta")
                new.weight = old.weight
                new.setup(tp_group, rank // kv_spec.replicas, tp // kv_spec.replicas)
                setattr(attn, proj, new)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.out_features = lin.weight.shape[0]
        for lin in (attn.o_proj, mlp.down_proj):
            lin.in_features = lin.weight.shape[1]

    model._tp = TPState(tp_group, tp, rank, sequence_parallel, specs, vp)
    return mark_shards(model)


def mark_shards(model):
    """Tag every parameter with its ShardSpec and TP degree (what ``tp_replicas`` / ``is_tp_replicated`` read).
    ``parallelize`` does it; call it again after anything that makes new Parameter objects (``to_empty``)."""
    st = model._tp
    for name, p in model.named_parameters():
        p._tp_spec = st.specs[name]
        p._tp_size = st.tp
    return model


# --------------------------------------------------------------------------- queries and helpers

def tp_group_of(model):
    """The TP process group the model was parallelized over, or None for an unsharded model."""
    st = getattr(model, "_tp", None)
    return None if st is None else st.group


def tp_replicas(param) -> int:
    """How many ranks of the TP group hold this exact tensor: tp for replicated parameters (norm weights),
    tp / num_kv_heads for replicated K/V weights, 1 for sharded ones (and 1 for an unsharded model).
    A global sum of squares over TP is sum(local_sq / tp_replicas(p)) all-reduced over the TP group."""
    spec = getattr(param, "_tp_spec", None)
    if spec is None:
        return 1
    return param._tp_size if spec.dim is None else spec.replicas


def is_tp_replicated(param) -> bool:
    """True when the parameter has the same full value on every rank of its TP group: the RMSNorm weights,
    K/V weights only when every rank holds the single KV head (num_kv_heads == 1, tp > 1), and every
    parameter of an unsharded model. K/V weights replicated over a subset of ranks (1 < tp/num_kv_heads < tp)
    are not: use ``tp_replicas`` for those."""
    spec = getattr(param, "_tp_spec", None)
    if spec is None:
        return True
    return spec.dim is None or spec.replicas == param._tp_size


def allreduce_replicated_grads(model) -> None:
    """Sum the gradients of the TP-replicated norm weights over the TP group (call after backward).

    With sequence parallelism each rank normalises a different slice of the sequence, so its norm-weight
    gradient is partial. Without it every rank saw the whole sequence and the gradients already agree:
    a no-op. K/V gradients under replication are summed inside autograd, not here.
    """
    st = getattr(model, "_tp", None)
    if st is None or not st.sequence_parallel or st.tp == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None and getattr(p, "_tp_spec", None) is not None
             and p._tp_spec.dim is None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=st.group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def full_state_dict(model, grads: bool = False) -> dict:
    """{HF-free parameter name: full unpadded tensor} gathered over TP (a collective every TP rank calls).
    With grads=True, the gathered gradients instead (None where a parameter has none)."""
    st = getattr(model, "_tp", None)
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            out[name] = None
            continue
        if st is None:
            out[name] = t.detach().clone()
        else:
            out[name] = gather_tensor(t, st.specs[name], st.group)
    return out


def apply_activation_checkpointing(model: Llama, mode: str = "full") -> Llama:
    """Recompute activations in the backward instead of storing them (torch.utils.checkpoint, non-reentrant).

    "full": each decoder layer stores only its input and recomputes everything in the backward.
    "selective": two regions per layer are recomputed: the attention core (RoPE + attention, storing q, k,
    v instead of the rotated q/k, the attention output and its log-sum-exp) and the MLP activation region
    (SwiGLU + down projection, storing gate and up but not the SwiGLU output). With TP the down projection's
    all-reduce / reduce-scatter is part of the region and is re-run in the recompute.
    "none": nothing. Applied by replacing the instance's methods, so parameter names do not change.
    """
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"apply_activation_checkpointing: mode must be 'none', 'full' or 'selective', got {mode!r}")
    if mode == "none":
        return model
    if getattr(model, "_ac_mode", "none") != "none":
        raise ValueError(f"apply_activation_checkpointing: already applied (mode {model._ac_mode!r})")
    model._ac_mode = mode

    def wrap(module, method):
        fn = getattr(type(module), method).__get__(module)
        setattr(module, method, functools.wraps(fn)(
            lambda *args, **kw: checkpoint(fn, *args, use_reentrant=False, **kw)))

    for layer in model.layers:
        if mode == "full":
            wrap(layer, "forward")
        elif mode == "selective":
            wrap(layer.self_attn, "core")
            wrap(layer.mlp, "activation")
    return model


__all__ = ["ParallelError", "ShardSpec", "TPState", "allreduce_replicated_grads", "apply_activation_checkpointing",
           "full_state_dict", "gather_tensor", "is_tp_replicated", "layout_ranks", "make_groups", "mark_shards",
           "padded_vocab", "parallelize", "plan", "shard_tensor", "tp_group_of", "tp_replicas"]
