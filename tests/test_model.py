"""The model on its own: shapes, loss semantics, rotary tables, native GQA, sim backend == reference backend.

Parity with transformers' LlamaForCausalLM is in test_hf.py; tensor parallelism in test_parallel.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.sim.trace
from kernels import ops
from llama import Llama, LlamaConfig
from llama.loss import LinearCrossEntropy
from llama.model import RotaryEmbedding

TINY_GQA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                max_seq_len=32)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**dict(TINY_GQA, **kw)))


def _batch(b=2, s=16, v=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, s), generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :4] = -100
    return ids, labels


def test_shapes_and_parameter_names():
    m = _model()
    ids, labels = _batch()
    assert m(ids).shape == (2, 16, 128)
    assert m(ids, labels=labels).dim() == 0
    names = {n for n, _ in m.named_parameters()}
    assert {"embed_tokens.weight", "layers.1.self_attn.k_proj.weight", "layers.0.mlp.up_proj.weight",
            "layers.0.post_attention_layernorm.weight", "norm.weight", "lm_head.weight"} <= names
    assert m.layers[0].self_attn.k_proj.weight.shape == (32, 64)            # 2 KV heads of 16
    assert sum(p.numel() for p in m.parameters()) == m.config.num_params()


def test_loss_against_float64_reference():
    m = _model()
    ids, labels = _batch()
    logits = m(ids).double()
    valid = labels != -100
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[valid]
    assert math.isclose(m(ids, labels=labels).item(), nll.mean().item(), rel_tol=1e-5)
    assert math.isclose(m(ids, labels=labels, reduction="sum").item(), nll.sum().item(), rel_tol=1e-5)



@pytest.mark.parametrize("chunk_elems", [1 << 23, 1000, 128])      # one chunk, several, one row per chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_against_unfused(chunk_elems, dtype):
    """Fused LM head + CE == F.linear + F.cross_entropy: loss and both gradients; ignored rows get 0 gradient."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, 16, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(100, 16, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 100, (2, 9), generator=g)
    labels[1, 2:5] = -100
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for reduction in ("mean", "sum"):
        loss = LinearCrossEntropy(chunk_elems)(h, w, labels, reduction)
        dh, dw = torch.autograd.grad(loss * 1.7, (h, w))
        h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        ref = F.cross_entropy(F.linear(h64, w64).view(-1, 100), labels.view(-1), reduction=reduction)
        rh, rw = torch.autograd.grad(ref * 1.7, (h64, w64))
        assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
        assert ((dh.double() - rh).abs().max() / rh.abs().max()).item() <= tol
        assert ((dw.double() - rw).abs().max() / rw.abs().max()).item() <= tol
        assert dh[1, 2:5].abs().max() == 0


def test_rotary_tables_hf_formula():
    d, theta, s = 16, 500.0, 12
    cos, sin = RotaryEmbedding(d, theta)(s, torch.float32)
    pos = torch.arange(s, dtype=torch.float64)[:, None]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv], dim=-1)
    torch.testing.assert_close(cos.double(), ang.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), ang.sin(), rtol=0, atol=1e-6)


def test_gqa_equals_repeated_kv_mha():
    """A GQA model equals the MHA model whose K/V weights repeat each KV head over its query group."""
    gqa = _model()
    mha = _model(num_kv_heads=4)
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if "k_proj" not in k and "v_proj" not in k},
                        strict=False)
    with torch.no_grad():
        for lg, lm in zip(gqa.layers, mha.layers):
            for proj in ("k_proj", "v_proj"):
                w = getattr(lg.self_attn, proj).weight.view(2, 16, 64)
                getattr(lm.self_attn, proj).weight.copy_(w.repeat_interleave(2, dim=0).reshape(64, 64))
    ids, _ = _batch()
    torch.testing.assert_close(mha(ids), gqa(ids), rtol=1e-5, atol=1e-6)


def test_causality():
    m = _model()
    ids, _ = _batch()
    ids2 = ids.clone()
    ids2[:, 10:] = (ids2[:, 10:] + 1) % 128
    a, b = m(ids), m(ids2)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])


def test_sim_backend_matches_reference():
    """The NKI kernels (RMSNorm, RoPE, SwiGLU) run by the interpreter give the reference's loss and gradients
    (fp32; tolerance 1e-5 relative to each tensor's max, the kernels reorder fp32 sums)."""
    m = _model(num_layers=1)
    ids, labels = _batch(1, 16)
    results = {}
    for backend in ("reference", "sim"):
        m.zero_grad()
        with kernels.sim.trace.record() as tr, ops.use_backend(backend):
            loss = m(ids, labels=labels)
            loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, tr)
    ref, sim = results["reference"], results["sim"]
    assert len(sim[2].instructions) > 0 and len(ref[2].instructions) == 0     # the kernels really ran
    assert math.isclose(sim[0].item(), ref[0].item(), rel_tol=1e-5)
    for n, g in ref[1].items():
        assert ((sim[1][n] - g).abs().max() / g.abs().max()).item() <= 1e-5, n


def test_bf16_forward_backward_runs():
    m = _model().to(torch.bfloat16)
    ids, labels = _batch()
    loss = m(ids, labels=labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = F.cross_entropy(m(ids).float().reshape(-1, 128), labels.reshape(-1))
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-6)
