"""The model on its own: shapes, loss semantics, rotary tables, native GQA, sim backend == reference backend.

Parity with transformers' LlamaForCausalLM is in test_hf.py; tensor parallelism in test_parallel.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

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


def _lce_reference64(h, w, labels, reduction):
    """Loss and both gradients in float64 through F.linear + F.cross_entropy (independent of llama/loss.py)."""
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h64, w64).view(-1, w.shape[0]), labels.view(-1), reduction=reduction)
    return (ref, *torch.autograd.grad(ref, (h64, w64)))


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@settings(max_examples=12)
@given(rows=st.integers(1, 40), v=st.integers(2, 90), hdim=st.integers(1, 24), chunk_rows=st.integers(1, 45),
       ignored=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_chunking_hypothesis(rows, v, hdim, chunk_rows, ignored, seed):
    """Any row count, vocabulary, hidden size and chunk size (uneven last chunk included) and any share of
    ignored rows: fp32 loss and gradients within 1e-5 (relative to each tensor's max) of float64."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, rows, hdim, generator=g, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (1, rows), generator=g)
    labels[torch.rand(1, rows, generator=g) < ignored] = -100
    labels[0, 0] = 0                                     # at least one valid row: the mean is defined
    loss = LinearCrossEntropy(chunk_rows * v)(h, w, labels, "mean")
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref, rh, rw = _lce_reference64(h, w, labels, "mean")
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert _rel(dh, rh) <= 1e-5 and _rel(dw, rw) <= 1e-5
    assert dh[labels == -100].abs().max().item() == 0 if (labels == -100).any() else True


def test_linear_cross_entropy_all_rows_ignored():
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss = LinearCrossEntropy(40)(h, w, labels, "sum")
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("chunk_elems", [1 << 23, 300])             # one chunk, several
def test_linear_cross_entropy_under_autocast(chunk_elems):
    """Under bf16 autocast (the trainer's mixed precision) the logits are bf16 as F.linear's would be, the loss
    equals F.linear + F.cross_entropy under the same autocast, and the gradients (fp32 weights -> fp32) are the
    float64 gradients up to the bf16 rounding of the logits; several chunks once crashed (bf16 dW accumulator)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, 32, generator=g, requires_grad=True)
    w = (torch.randn(50, 32, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[2, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy(chunk_elems)(h, w, labels)
        same = F.cross_entropy(F.linear(h, w).float().view(-1, 50), labels.view(-1))
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref, rh, rw = _lce_reference64(h, w, labels, "mean")
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), same.item(), rel_tol=1e-6)
    assert dh.dtype == dw.dtype == torch.float32
    assert _rel(dh, rh) <= 2e-2 and _rel(dw, rw) <= 2e-2
    assert dh[2, :3].abs().max() == 0


@pytest.mark.parametrize("chunk_elems", [1 << 23, 300])
def test_linear_cross_entropy_bf16_weights(chunk_elems):
    """bf16 hidden and weight: bf16 logits upcast to fp32 (loss = F.linear(...).float() + cross-entropy),
    gradients returned in bf16, within bf16 rounding of float64."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 9, 32, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(60, 32, generator=g) * 0.3).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 60, (2, 9), generator=g)
    labels[0, 4:] = -100
    loss = LinearCrossEntropy(chunk_elems)(h, w, labels)
    dh, dw = torch.autograd.grad(loss, (h, w))
    same = F.cross_entropy(F.linear(h, w).float().view(-1, 60), labels.view(-1))
    ref, rh, rw = _lce_reference64(h, w, labels, "mean")
    assert math.isclose(loss.item(), same.item(), rel_tol=1e-6)
    assert dh.dtype == dw.dtype == torch.bfloat16
    assert _rel(dh, rh) <= 2e-2 and _rel(dw, rw) <= 2e-2


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
