"""llama.plan: the memory formulas against measured peaks on CPU, and the planner's bookkeeping.

Memory: each case runs two optimizer steps of a small fp32 model in a fresh process (tests/plan_measure.py) and
compares the peak resident size (glibc told to mmap every tensor over 64 KiB, so freed tensors leave the RSS) with
``plan.stage_memory(..., precision="fp32", backend="reference")``: within 10%, the issue's criterion. The cases
cover no and full activation checkpointing and gradient accumulation, with activations the largest part; the
selective mode's per-layer bytes are checked exactly against autograd's saved tensors.
"""
import json
import os
import subprocess
import sys

import pytest

from llama import LlamaConfig
from llama import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8, num_kv_heads=4,
           max_seq_len=512)


def measure(spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "plan_measure.py"), json.dumps(spec)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["peak"]


@pytest.mark.parametrize("ac,batch,seq,accum", [("none", 4, 256, 1), ("full", 4, 256, 1), ("none", 2, 256, 2)])
def test_predicted_peak_within_10_percent_of_measured(ac, batch, seq, accum):
    measured = measure(dict(cfg=CFG, batch=batch, seq=seq, accum=accum, ac=ac))
    lay = plan.Layout(1, 1, 1, ac, False, batch, accum)
    mem = plan.stage_memory(LlamaConfig(**CFG), lay, seq, 0, precision="fp32", backend="reference")
    assert mem.activations > mem.params or ac == "full"
    assert abs(mem.total - measured) <= 0.10 * measured, (mem, measured, mem.total / measured)


def test_layer_activations_match_the_saved_tensors():
    """The per-layer term equals the bytes autograd saves for one decoder layer (distinct storages, no params)."""
    import torch
    from llama import Llama
    from llama import parallel as P
    cfg = LlamaConfig(**dict(CFG, num_layers=1))
    b, s = 2, 64
    for ac in ("none", "selective", "full"):
        torch.manual_seed(0)
        m = P.apply_activation_checkpointing(Llama(cfg), ac)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t
        h = m.embed_tokens(torch.randint(0, cfg.vocab_size, (b, s))).detach().requires_grad_(True)
        cos, sin = m.rotary(s, h.dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.layers[0](h, cos, sin)
        tables = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()
        want = plan.layer_activation_bytes(cfg, b, s, 1, False, ac, 4, backend="reference")
        assert sum(seen.values()) - tables == want, ac


def test_parameters_over_all_cores_sum_to_the_model():
    for name in ("llama2-7b", "llama2-70b"):
        cfg = LlamaConfig.preset(name)
        for tp, pp in ((8, 1), (8, 4), (4, 8)):
            layers = plan.stage_layers(cfg, pp)
            assert sum(layers) == cfg.num_layers
            total = sum(tp * plan.stage_params(cfg, tp, pp, r, layers[r]) for r in range(pp))
            norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * (tp - 1)      # replicated on every TP rank
            kv_copies = 0
            if cfg.num_kv_heads < tp:
                kv_copies = 2 * cfg.num_layers * cfg.hidden_size * cfg.head_dim * (tp - cfg.num_kv_heads)
            assert total == cfg.num_params() + norms + kv_copies, (name, tp, pp)


def test_step_time_parts():
    cfg = LlamaConfig.preset("llama2-7b")
    lay = plan.Layout(8, 1, 4, "none", False, 1, 64)
    t = plan.step_time(cfg, lay, 4096)
    # compute = all FLOPs of the step over the 32 cores' peak (one core's share of TP x DP)
    flops = cfg.flops_per_token(4096) * 4096 * 256
    assert t["compute"] == pytest.approx(flops / (32 * plan.TRN1.peak_flops_per_core), rel=1e-9)
    assert t["bubble"] == pytest.approx(0.0, abs=1e-12)
    pipe = plan.Layout(8, 4, 1, "none", False, 1, 256)
    tp_ = plan.step_time(cfg, pipe, 4096)
    per_mb = (tp_["compute"] + tp_["tp_comm"] + tp_["pp_comm"]) / 256
    assert tp_["bubble"] == pytest.approx(3 * per_mb, rel=1e-9)          # (pp - 1) micro-batch slots


def test_in_flight_micro_batches():
    assert plan.in_flight(plan.Layout(1, 4, 1, accum=8, schedule="1f1b"), 0) == 4
    assert plan.in_flight(plan.Layout(1, 4, 1, accum=8, schedule="1f1b"), 3) == 1
    assert plan.in_flight(plan.Layout(1, 4, 1, accum=8, schedule="gpipe"), 3) == 8
    assert plan.in_flight(plan.Layout(1, 4, 1, accum=8, schedule="interleaved", virtual=2), 0) == (4 + 6 + 1) / 2


def test_cli_prints_every_layout_and_the_seed_comparison(capsys):
    assert plan.main(["--model", "llama2-70b", "--nodes", "4", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out and "GiB/core" in out and "yes" in out and "NO" in out
    assert plan.main(["--model", "llama2-7b", "--nodes", "1", "--seed-comparison", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "3.7" in out and "7.4" in out and "14.6" in out
    # predictions are ideal bounds: never below what the runs published
    for nodes, published in plan.SEED_PUBLISHED.items():
        lay = plan.Layout(8, 1, 4 * nodes, "selective", True, 1, 256 // (4 * nodes))
        assert 256 / plan.step_time(LlamaConfig.preset("llama2-7b"), lay, 4096)["total"] > published
