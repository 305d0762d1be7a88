"""training.reshard: rank files written under one (TP, PP) layout rebuilt for another, in one process.

A reference model and its AdamW state (a few real steps, so the moments are non-trivial) are cut into the rank files
each layout would write (TP shards via llama.parallel.plan / shard_tensor, PP stages via llama.pipeline's split,
parameter names in optimizer order), then ``resharded_state`` builds every rank of another layout. Exact: weights and
moments must equal the reference's shards bit for bit (resharding only copies).
"""
import json
import os

import pytest
import torch

from llama import Llama, LlamaConfig
from llama import parallel as P
from llama import pipeline as PL
from training import checkpoint as ckpt
from training import reshard

CFG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  max_seq_len=16)


def _trained():
    torch.manual_seed(0)
    model = Llama(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        ids = torch.randint(0, CFG.vocab_size, (2, 8))
        model(ids, labels=ids).backward()
        opt.step()
        opt.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    full_opt = {names[i]: s for i, s in opt.state_dict()["state"].items()}
    return model.state_dict(), full_opt, opt.state_dict()["param_groups"][0]


def _stage_names(tp, pp, pp_rank):
    """Parameter names of a stage (the split llama.pipeline uses), in a model's named_parameters order."""
    ranges = PL.split_layers(CFG, pp)
    keep = {f"layers.{i}." for i in ranges[pp_rank]}
    return [n for n in Llama(CFG).state_dict() if any(n.startswith(k) for k in keep)
            or (n.startswith("embed") and pp_rank == 0) or (n.split(".")[0] in ("norm", "lm_head") and
                                                              pp_rank == pp - 1)]


def _write(path, weights, moments, group, tp, pp):
    specs = P.plan(CFG, tp)
    os.makedirs(path)
    for pp_rank in range(pp):
        names = _stage_names(tp, pp, pp_rank)
        for tp_rank in range(tp):
            cut = lambda n, t: P.shard_tensor(t, specs[n], tp_rank, tp)      # noqa: E731
            state = {i: {k: cut(n, v) if v.dim() else v for k, v in moments[n].items()} for i, n in enumerate(names)}
            torch.save(dict(model={n: cut(n, weights[n]) for n in names}, param_names=names, step=2,
                            optimizer=dict(state=state, param_groups=[dict(group, params=list(range(len(names))))]),
                            loader=dict(dp=0), rng=None), os.path.join(path, ckpt.rank_file(tp_rank, 0, pp_rank)))
    return _finish(path, tp=tp, pp=pp, dp=1)


def _finish(path, **layout):
    """meta.json as training.checkpoint writes it (complete, the rank files and their sizes); returns it."""
    files = {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path)) if f.endswith(".pt")}
    meta = dict(layout, format=ckpt.FORMAT_VERSION, complete=True, step=2, files=files)
    with open(os.path.join(path, "meta.json"), "w") as fh:
        json.dump(meta, fh)
    return meta


class _Target:
    """What a rank of the new layout would have built: its (sharded, staged) model and a fresh optimizer."""

    def __init__(self, tp, pp, pp_rank, tp_rank):
        names = _stage_names(tp, pp, pp_rank)
        specs = P.plan(CFG, tp)
        self.model = torch.nn.Module()
        self.names = names
        self.params = [torch.nn.Parameter(P.shard_tensor(torch.zeros(s), specs[n], tp_rank, tp))
                       for n, s in ((n, Llama(CFG).state_dict()[n].shape) for n in names)]
        self.model.state_dict = lambda: {n: p.detach() for n, p in zip(names, self.params)}
        self.opt = torch.optim.AdamW(self.params, lr=1.0)


@pytest.mark.parametrize("old,new", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (1, 2)), ((1, 2), (2, 1))])
def test_reshard_is_exact(tmp_path, old, new):
    weights, moments, group = _trained()
    meta = _write(str(tmp_path / "ck"), weights, moments, group, *old)
    tp, pp = new
    specs = P.plan(CFG, tp)
    seen = set()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            t = _Target(tp, pp, pp_rank, tp_rank)
            st = reshard.resharded_state(str(tmp_path / "ck"), meta, CFG, t.model, t.opt, t.names, tp, tp_rank, 0)
            for n in t.names:
                assert torch.equal(st["model"][n], P.shard_tensor(weights[n], specs[n], tp_rank, tp)), n
                s = st["optimizer"]["state"][t.names.index(n)]
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(s[k], P.shard_tensor(moments[n][k], specs[n], tp_rank, tp)), (n, k)
                assert torch.equal(s["step"], moments[n]["step"])
                seen.add(n)
            assert st["optimizer"]["param_groups"][0]["lr"] == group["lr"] != 1.0
            assert st["step"] == 2 and st["loader"] == dict(dp=0)
            t.opt.load_state_dict(st["optimizer"])         # loads into the optimizer as built
    assert seen == set(weights)


def test_reshard_refusals(tmp_path):
    meta = dict(tp=2, pp=1, dp=2)
    with pytest.raises(ckpt.CheckpointError, match="written with dp 2; resuming under dp 1"):
        reshard.check_reshardable("ck", meta, 1, 1, 1, zero1=False)
    with pytest.raises(ckpt.CheckpointError, match="not supported with ZeRO-1"):
        reshard.check_reshardable("ck", meta, 1, 1, 2, zero1=True)
    os.makedirs(tmp_path / "old")
    torch.save(dict(model={}), tmp_path / "old" / ckpt.rank_file(0, 0))
    _finish(str(tmp_path / "old"), tp=1, pp=1, dp=1)
    with pytest.raises(ckpt.CheckpointError, match="no parameter names"):
        reshard.resharded_state(str(tmp_path / "old"), dict(tp=1, pp=1, dp=1), CFG, None, None, [], 1, 0, 0)
    os.makedirs(tmp_path / "half")
    torch.save(dict(model={}, param_names=[]), tmp_path / "half" / ckpt.rank_file(0, 0))
    _finish(str(tmp_path / "half"), tp=2, pp=1, dp=1)
    with pytest.raises(ckpt.CheckpointError, match="has no file for tp rank 1, pp rank 0"):
        reshard.resharded_state(str(tmp_path / "half"), dict(tp=2, pp=1, dp=1), CFG, None, None, [], 1, 0, 0)
