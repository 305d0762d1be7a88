"""Pipeline parallelism (llama.pipeline on torch.distributed.pipelining) against the single-process step.

Each case trains STEPS SGD steps of a 4-layer fp32 model on the same micro-batches as a single-process run of
the trainer's step (micro-batch losses summed, divided by the global valid-token count, one backward each) computed
in every worker from the same seed. Checked per case: the loss sequence (relative difference <= 1e-6), every
gradient of the first step gathered to full shape and the weights after the last step (tolerances in
``_tolerance``: 1e-6 for pure PP; TP shards and DP sums change the summation order).
One spawn per world size runs every case (process start-up is the cost).
"""
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from llama import Llama, LlamaConfig
from llama import parallel as P
from llama import pipeline as PL

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
           max_seq_len=32)
SEQ, MICRO, ACCUM, STEPS = 8, 2, 4, 3
LOSS_RTOL = 1e-6


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _micro_batches(step, dp):
    """The step's dp * ACCUM micro-batches (rank d of DP takes [d * ACCUM, (d + 1) * ACCUM))."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(dp * ACCUM):
        ids = torch.randint(0, CFG["vocab_size"], (MICRO, SEQ), generator=g)
        labels = torch.randint(0, CFG["vocab_size"], (MICRO, SEQ), generator=g)
        labels[0, : int(torch.randint(0, SEQ, (1,), generator=g))] = -100     # uneven valid counts
        out.append((ids, labels))
    return out


def _optimizer(params):
    # SGD, not AdamW: Adam's m / sqrt(v) turns last-bit differences of near-zero gradients (TP and DP reorder sums)
    # into +-lr steps, so weights after Adam would compare the summation order, not the pipeline.
    return torch.optim.SGD(params, lr=0.5)


def _model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(**CFG))


def _reference(dp):
    model = _model()
    opt = _optimizer(model.parameters())
    losses, grads = [], None
    for step in range(STEPS):
        micro = _micro_batches(step, dp)
        n_valid = sum(int((lbl != -100).sum()) for _, lbl in micro)
        total = 0.0
        for ids, lbl in micro:
            loss = model(ids, labels=lbl, reduction="sum")
            (loss / n_valid).backward()
            total += loss.item()
        losses.append(total / n_valid)
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _pipeline_case(tp, pp, schedule, virtual, ref):
    world = dist.get_world_size()
    dp = PL.check_layout(LlamaConfig(**CFG), world, tp, pp, schedule, virtual, ACCUM)
    tp_group, pp_group, dp_group = P.make_groups(tp, pp)
    tp_rank, pp_rank, dp_rank = P.layout_ranks(dist.get_rank(), tp, pp, dp)
    model = _model()
    if tp > 1:
        P.parallelize(model, tp_group, sequence_parallel=True)
    stages = PL.split_stages(model, pp, pp_rank, virtual)
    pipe = PL.Pipeline(stages, pp_group, schedule, ACCUM, MICRO, SEQ, torch.device("cpu"), torch.float32)
    params = pipe.parameters()
    opt = _optimizer(params)
    ref_losses, ref_grads, ref_weights = ref
    errs = {}
    for step in range(STEPS):
        micro = _micro_batches(step, dp)
        n_valid = torch.tensor(float(sum(int((lbl != -100).sum()) for _, lbl in micro)))
        mine = micro[dp_rank * ACCUM:(dp_rank + 1) * ACCUM]
        ids = torch.cat([m[0] for m in mine])
        labels = torch.cat([m[1] for m in mine])
        loss = pipe.step(ids, labels, n_valid)
        for s in stages:
            P.allreduce_replicated_grads(s)
        if dp > 1:
            for p in params:
                dist.all_reduce(p.grad, group=dp_group)
        if loss is not None:
            if dp > 1:
                dist.all_reduce(loss, group=dp_group)
            errs[f"loss step {step}"] = abs(loss.item() - ref_losses[step]) / abs(ref_losses[step])
        if step == 0:
            for s in stages:
                for name, g in P.full_state_dict(s, grads=True).items():
                    errs[f"grad {name}"] = _rel(g, ref_grads[name])
        opt.step()
        opt.zero_grad(set_to_none=True)
    for s in stages:
        for name, w in P.full_state_dict(s).items():
            errs[f"weight {name}"] = _rel(w, ref_weights[name])
    return errs


def _layout_checks(rank, world):
    """make_groups' 3-D layout on 4 ranks, tp 1 x pp 2 x dp 2: stages are blocks of dp * tp consecutive ranks."""
    ranks = dist.get_process_group_ranks
    tp_g, pp_g, dp_g = P.make_groups(1, 2)
    stage, d = rank // 2, rank % 2
    ok = ranks(pp_g) == [d, d + 2] and ranks(dp_g) == [2 * stage, 2 * stage + 1] and ranks(tp_g) == [rank]
    tp_g, pp_g, dp_g = P.make_groups(2, 2)
    ok &= ranks(tp_g) == [rank // 2 * 2, rank // 2 * 2 + 1] and ranks(pp_g) == [rank % 2, rank % 2 + 2]
    ok &= ranks(dp_g) == [rank] and P.layout_ranks(rank, 1, 2, 2) == (0, stage, d)
    return {"make_groups layout": 0.0 if ok else 1.0}


def _hf_checks(rank, ckpt, out_dir):
    """from_hf with pipeline stages reads exactly its stages' tensors (bitwise the file's); to_hf of the two
    stages writes the original file back, bit for bit."""
    import llama
    from safetensors.torch import load_file
    _, pp_group, _ = P.make_groups(1, 2)
    local = llama.from_hf(ckpt, pipeline=dict(pp=2, pp_rank=rank))
    src = load_file(f"{ckpt}/model.safetensors")
    mine = dict(local.named_parameters())
    want = [n for n in _model().state_dict() if (n.startswith("embed") or n.startswith("layers.0.")
                                                  or n.startswith("layers.1.")) == (rank == 0)]
    errs = {"from_hf stage names": float(sorted(mine) != sorted(want))}
    errs["from_hf stage bits"] = float(any(not torch.equal(p.detach(), src[llama.hf.hf_name(n)])
                                           for n, p in mine.items()))
    llama.to_hf(local, out_dir, pp_group=pp_group)
    dist.barrier()
    if rank == 0:
        out = load_file(f"{out_dir}/model.safetensors")
        errs["to_hf bit-identical"] = float(sorted(out) != sorted(src) or any(not torch.equal(out[k], src[k])
                                                                               for k in src))
    return errs


def _worker(rank, world, cases, ckpt=None, out_dir=None):
    refs = {}
    out = _layout_checks(rank, world) if world == 4 else {}
    if ckpt is not None and world == 2:
        out.update(_hf_checks(rank, ckpt, out_dir))
    if ckpt is not None and world == 4:           # from_hf under TP keeps every parameter's shard tag
        import llama
        tp_group, _ = P.make_groups(2)
        m = llama.from_hf(ckpt, tp_group=tp_group, sequence_parallel=True)
        untagged = [n for n, p in m.named_parameters() if getattr(p, "_tp_spec", None) is None]
        out["from_hf tp shard tags"] = float(bool(untagged) or P.tp_replicas(m.norm.weight) != 2)
    for tp, pp, schedule, virtual in cases:
        dp = world // (tp * pp)
        if dp not in refs:
            refs[dp] = _reference(dp)
        label = f"tp{tp} pp{pp} dp{dp} {schedule}"
        for k, v in _pipeline_case(tp, pp, schedule, virtual, refs[dp]).items():
            out[f"{label}: {k}"] = v
    return out


def _tolerance(key):
    """1e-6 relative for losses, and for everything of the pure-PP cases (same arithmetic as one process); TP shards
    and DP sums change summation order: 1e-5 for gradients and weights (tests/test_parallel.py's tolerance)."""
    reordered = not key.startswith("tp1 pp2 dp1 ")
    if ": loss" in key or not reordered:
        return LOSS_RTOL
    return 1e-5


def _check(results):
    return {k: v for r in results for k, v in r.items() if not v <= _tolerance(k)}


def test_pp2_matches_single_process(tmp_path):
    import llama
    llama.to_hf(_model(), tmp_path / "in")
    cases = [(1, 2, "gpipe", 1), (1, 2, "1f1b", 1), (1, 2, "interleaved", 2)]
    results = run_distributed(_worker, 2, cases, str(tmp_path / "in"), str(tmp_path / "out"))
    keys = set().union(*results)
    assert "to_hf bit-identical" in keys and "from_hf stage bits" in keys
    for sched in ("gpipe", "1f1b", "interleaved"):
        assert f"tp1 pp2 dp1 {sched}: loss step {STEPS - 1}" in keys
        assert f"tp1 pp2 dp1 {sched}: grad layers.3.mlp.down_proj.weight" in keys
        assert f"tp1 pp2 dp1 {sched}: grad embed_tokens.weight" in keys
    bad = _check(results)
    assert not bad, bad


def test_tp2_pp2_and_pp2_dp2_match_single_process(tmp_path):
    import llama
    llama.to_hf(_model(), tmp_path / "in")
    cases = [(2, 2, s, v) for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))]
    cases += [(1, 2, s, v) for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))]
    results = run_distributed(_worker, 4, cases, str(tmp_path / "in"))
    keys = set().union(*results)
    assert "make_groups layout" in keys and "from_hf tp shard tags" in keys
    assert "tp2 pp2 dp1 interleaved: loss step 2" in keys and "tp1 pp2 dp2 1f1b: loss step 2" in keys
    bad = _check(results)
    assert not bad, bad


def test_layer_split():
    cfg = LlamaConfig.preset("llama2-70b")
    ranges = PL.split_layers(cfg, 4)
    assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]] and ranges[-1].stop == 80
    emb, layer, head = PL.layer_params(cfg)
    weights = [len(r) * layer + (emb if i == 0 else 0) + (head if i == 3 else 0) for i, r in enumerate(ranges)]
    # no other contiguous split has a smaller largest stage (exhaustive over the first three cut points)
    best = min(max(a * layer + emb, b * layer, c * layer, (80 - a - b - c) * layer + head)
               for a in range(1, 78) for b in range(1, 79 - a) for c in range(1, 80 - a - b))
    assert max(weights) == best
    assert [list(r) for r in PL.split_layers(LlamaConfig(**CFG), 2, [1, 3])] == [[0], [1, 2, 3]]
    assert PL.stage_indices(2, 1, 2) == [1, 3]


@pytest.mark.parametrize("kw,msg", [
    (dict(world=6, tp=2, pp=2), "world size 6 is not a multiple of tp 2 x pp 2"),
    (dict(world=4, tp=1, pp=4, split="even", cfg=dict(num_layers=6)), "num_layers 6 is not divisible by the 4 stages"),
    (dict(world=2, tp=1, pp=2, schedule="interleaved", virtual=3), "2 x 3 virtual stage"),
    (dict(world=2, tp=1, pp=2, schedule="1f1b", virtual=2), "need the 'interleaved' schedule"),
    (dict(world=2, tp=1, pp=2, schedule="interleaved", virtual=2, n_microbatches=3), "multiple of pp 2"),
    (dict(world=4, tp=1, pp=4, schedule="1f1b", n_microbatches=2), "at least pp = 4 micro-batches"),
    (dict(world=2, tp=1, pp=2, schedule="zb"), "schedule 'zb' is not one of"),
    (dict(world=2, tp=1, pp=2, split=[1, 2]), "explicit split [1, 2]"),
    (dict(world=2, tp=1, pp=2, cfg=dict(tie_word_embeddings=True)), "tie_word_embeddings"),
])
def test_bad_layouts_refused(kw, msg):
    cfg = LlamaConfig(**dict(CFG, **kw.pop("cfg", {})))
    world, tp, pp = kw.pop("world"), kw.pop("tp"), kw.pop("pp")
    with pytest.raises(P.ParallelError) as e:
        PL.check_layout(cfg, world, tp, pp, **kw)
    assert msg in str(e.value), str(e.value)
