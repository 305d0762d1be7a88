"""Tensor parallelism: TP=2 and TP=4 (gloo processes on this machine) against TP=1, loss and every gradient.

One spawn per TP degree runs every case (process start-up is the cost). The TP=1 reference is computed in
each worker from the same seed, without collectives; gradients of the sharded model are gathered to full
shape. Tolerance: fp32, max |a - b| <= 1e-5 * max |b| per tensor (TP only changes summation order).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

import llama
from llama import Llama, LlamaConfig
from llama import parallel as P

RTOL = 1e-5
SEQ = 16


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _batch(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
    labels[0, :5] = -100                     # padded targets must contribute nothing
    labels[1, -1] = -100
    return ids, labels


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Llama(cfg)


def _run_case(cfg, tp_group, sp, ac="none", pad=None, reduction="mean"):
    """(errors dict, loss) comparing a TP model with its unsharded twin on one batch."""
    ids, labels = _batch(cfg, 1)
    ref = _model(cfg)
    ref_loss = ref(ids, labels=labels, reduction=reduction)
    ref_loss.backward()
    ref_logits = ref(ids).detach()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    model = P.parallelize(_model(cfg), tp_group, sequence_parallel=sp, pad_vocab_to_multiple_of=pad)
    P.apply_activation_checkpointing(model, ac)
    loss = model(ids, labels=labels, reduction=reduction)
    loss.backward()
    P.allreduce_replicated_grads(model)
    grads = P.full_state_dict(model, grads=True)
    errs = {"loss": _rel(loss.detach(), ref_loss.detach())}
    for name, g in grads.items():
        errs["grad " + name] = _rel(g, ref_grads[name])
    errs["logits"] = _rel(model(ids).detach(), ref_logits)
    # Replicated parameters must stay identical on every rank (same gradient everywhere).
    for name, p in model.named_parameters():
        if P.is_tp_replicated(p):
            g = p.grad.clone()
            dist.all_reduce(g, op=dist.ReduceOp.MAX, group=tp_group)
            errs["replica-agree " + name] = _rel(p.grad, g) if g.abs().max() > 0 else 0.0
    return errs


def _ce_check(tp_group, rank, tp):
    """Vocab-parallel LM head + CE with -100 targets and a padded vocabulary == F.linear + F.cross_entropy."""
    v, n, hdim = 250, 40, 16
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, hdim, generator=g)
    weight = torch.randn(v, hdim, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    out = {}
    for reduction in ("mean", "sum"):
        h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ref = F.cross_entropy(F.linear(h_ref, w_ref), labels, ignore_index=-100, reduction=reduction)
        ref.backward()
        spec = P.ShardSpec(0, v, P.padded_vocab(v, tp, 8))
        start, stop, local = spec.local_range(rank, tp)
        w_shard = P.shard_tensor(weight, spec, rank, tp).requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        ce = P.VocabParallelCrossEntropy(tp_group, start, stop - start)
        loss = ce(P._CopyToTP.apply(h, tp_group), w_shard, labels, reduction=reduction)
        loss.backward()
        out[f"ce {reduction} loss"] = _rel(loss.detach(), ref.detach())
        out[f"ce {reduction} grad hidden"] = _rel(h.grad, h_ref.grad)
        out[f"ce {reduction} grad weight"] = _rel(P.gather_tensor(w_shard.grad, spec, tp_group), w_ref.grad)
        pad_rows = w_shard.grad[stop - start:]
        out[f"ce {reduction} padded-rows-zero"] = pad_rows.abs().max().item() if pad_rows.numel() else 0.0
        logits = F.linear(hidden, w_shard.detach()).requires_grad_(True)
        per_tok = P._VocabParallelCE.apply(logits, labels, start, stop - start, tp_group, -100)
        per_tok.sum().backward()
        out[f"ce {reduction} ignored-rows-zero"] = logits.grad[labels == -100].abs().max().item()
    return out


def _hf_checks(tp_group, rank, ckpt, out_dir):
    """from_hf at this TP degree (plain, and with a padded vocabulary) == unsharded from_hf; to_hf of the
    sharded models == the original bytes."""
    from safetensors.torch import load_file
    ref = llama.from_hf(ckpt)
    ids, labels = _batch(ref.config, 3)
    errs = {}
    for tag, kw in (("", dict(sequence_parallel=True)), (" padded", dict(pad_vocab_to_multiple_of=3))):
        model = llama.from_hf(ckpt, tp_group=tp_group, **kw)
        errs["from_hf logits" + tag] = _rel(model(ids).detach(), ref(ids).detach())
        errs["from_hf loss" + tag] = _rel(model(ids, labels=labels).detach(), ref(ids, labels=labels).detach())
        target = out_dir + tag.strip()
        llama.to_hf(model, target)
        dist.barrier()
        if rank == 0:
            a, b = load_file(f"{ckpt}/model.safetensors"), load_file(f"{target}/model.safetensors")
            errs["to_hf same keys" + tag] = float(sorted(a) != sorted(b))
            errs["to_hf bit-identical" + tag] = float(any(not torch.equal(a[k].view(torch.int32),
                                                                          b[k].view(torch.int32)) for k in a))
    if P.tp_group_of(model) is not tp_group or P.tp_group_of(ref) is not None:
        errs["tp_group_of"] = 1.0
    return errs


def _sp_length_error(tp_group, world):
    model = P.parallelize(_model(LlamaConfig(**TINY)), tp_group, sequence_parallel=True)
    try:
        model(torch.zeros(1, 4 * world + 1, dtype=torch.long))
    except P.ParallelError as e:
        return 0.0 if f"sequence length {4 * world + 1}" in str(e) else 1.0
    return 1.0


def _worker(rank, world, cases, ckpt, out_dir):
    group = dist.new_group(list(range(world)))
    results = {}
    for label, cfg_kwargs, kw in cases:
        cfg = LlamaConfig(**cfg_kwargs)
        for k, e in _run_case(cfg, group, **kw).items():
            results[f"{label}: {k}"] = e
    results.update(_ce_check(group, rank, world))
    results["sp length error"] = _sp_length_error(group, world)
    if ckpt is not None:
        results.update(_hf_checks(group, rank, ckpt, out_dir))
    # make_groups: a 1 x world grid (TP = world) and the DP group of one rank each.
    tp_g, dp_g = P.make_groups(world)
    results["make_groups tp size"] = float(dist.get_world_size(tp_g) != world)
    results["make_groups dp size"] = float(dist.get_world_size(dp_g) != 1)
    if world == 4:                               # a 2 (DP) x 2 (TP) grid: TP = consecutive ranks
        tp_g, dp_g = P.make_groups(2)
        results["make_groups 2x2 tp ranks"] = float(dist.get_process_group_ranks(tp_g) != [rank // 2 * 2,
                                                                                          rank // 2 * 2 + 1])
        results["make_groups 2x2 dp ranks"] = float(dist.get_process_group_ranks(dp_g) != [rank % 2, rank % 2 + 2])
    return results


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=4,
            max_seq_len=64)


def _cases(tp):
    gqa2 = dict(TINY, num_kv_heads=2)            # tp=4 > 2 KV heads: KV-head replication
    mqa = dict(TINY, num_kv_heads=1, num_layers=1)
    odd_vocab = dict(TINY, vocab_size=250, num_layers=1)
    tied = dict(TINY, tie_word_embeddings=True, num_layers=1)
    return [
        ("mha", TINY, dict(sp=False)),
        ("mha sp", TINY, dict(sp=True)),
        ("gqa", gqa2, dict(sp=False)),
        ("gqa sp full-ac", gqa2, dict(sp=True, ac="full")),
        ("gqa selective-ac sum", gqa2, dict(sp=False, ac="selective", reduction="sum")),
        ("mqa sp", mqa, dict(sp=True)),
        ("padded vocab sp", odd_vocab, dict(sp=True, pad=8)),
        ("tied", tied, dict(sp=False)),
    ]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = LlamaConfig(**dict(TINY, num_kv_heads=2))
    llama.to_hf(_model(cfg, seed=7), d / "in")
    return d


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(tp, hf_checkpoint):
    out_dir = hf_checkpoint / f"out{tp}"
    results = run_distributed(_worker, tp, _cases(tp), str(hf_checkpoint / "in"), str(out_dir))
    assert set(results[0]) >= {"mha: loss", "gqa sp full-ac: grad layers.1.self_attn.k_proj.weight"}
    bad = {k: v for r in results for k, v in r.items() if not v <= RTOL}
    assert not bad, f"TP={tp} differs from TP=1 (relative error > {RTOL}): {bad}"
    from transformers import LlamaForCausalLM
    LlamaForCausalLM.from_pretrained(out_dir)      # transformers loads what the sharded model wrote


def test_plan_errors():
    cfg = LlamaConfig(**TINY)
    with pytest.raises(P.ParallelError, match="TP degree 3 does not divide num_heads 4"):
        P.plan(cfg, 3)
    odd_kv = LlamaConfig(**dict(TINY, hidden_size=96, num_heads=6, num_kv_heads=3, intermediate_size=192))
    with pytest.raises(P.ParallelError, match="TP degree 2 neither divides num_kv_heads 3"):
        P.plan(odd_kv, 2)
    with pytest.raises(P.ParallelError, match="vocab_size 250 is not divisible by the TP degree 4"):
        P.plan(cfg.replace(vocab_size=250), 4)
    assert P.padded_vocab(250, 4, 8) == 256
    assert P.plan(cfg.replace(num_kv_heads=2), 4)["layers.0.self_attn.k_proj.weight"].replicas == 2


def test_shard_spec_ranges():
    spec = P.ShardSpec(0, 250, 256, 1)
    ranges = [spec.local_range(r, 4) for r in range(4)]
    assert ranges == [(0, 64, 64), (64, 128, 64), (128, 192, 64), (192, 250, 64)]
    kv = P.ShardSpec(0, 32, 32, 2)               # 2 KV heads of 16 over 4 ranks: ranks 0,1 -> head 0
    assert [kv.local_range(r, 4)[:2] for r in range(4)] == [(0, 16), (0, 16), (16, 32), (16, 32)]
    x = torch.arange(250 * 3).view(250, 3)
    shards = [P.shard_tensor(x, spec, r, 4) for r in range(4)]
    assert all(s.shape == (64, 3) for s in shards)
    assert torch.equal(torch.cat(shards)[:250], x) and shards[3][58:].abs().sum() == 0


def test_activation_checkpointing_same_grads():
    cfg = LlamaConfig(**dict(TINY, num_kv_heads=2))
    ids, labels = _batch(cfg, 2)
    grads = {}
    for mode in ("none", "full", "selective"):
        m = P.apply_activation_checkpointing(_model(cfg), mode)
        m(ids, labels=labels).backward()
        grads[mode] = {n: p.grad for n, p in m.named_parameters()}
    for mode in ("full", "selective"):
        for n, g in grads[mode].items():
            assert torch.equal(g, grads["none"][n]), (mode, n)
    with pytest.raises(ValueError, match="mode must be"):
        P.apply_activation_checkpointing(_model(cfg), "partial")
