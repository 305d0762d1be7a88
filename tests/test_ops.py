"""kernels.ops (custom ops, backend selection, validation) and kernels.reference (numerics).

References here are written independently of kernels/reference.py: float64 formulas of Hugging Face
Llama (rotate_half, LlamaRMSNorm), silu, and attention with an explicit repeat_interleave of K/V.
The sim backend of the three NKI kernels is tested with the kernels (tests/test_kernel_*.py).
"""
import contextlib
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernels import ops, reference

F64 = torch.float64


@pytest.fixture(autouse=True)
def _automatic_backend():
    """Every test starts and ends on the automatic choice (reference on CPU)."""
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------- independent float64 formulas

def rmsnorm64(x, w, eps):
    x = x.to(F64)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.to(F64)


def hf_rotate_half64(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rope64(q, k, cos, sin):
    # HF apply_rotary_pos_emb with unsqueeze_dim=1; [S, D] tables broadcast over batch as well.
    c = cos.to(F64).unsqueeze(-3)
    s = sin.to(F64).unsqueeze(-3)
    q, k = q.to(F64), k.to(F64)
    return q * c + hf_rotate_half64(q) * s, k * c + hf_rotate_half64(k) * s


def swiglu64(g, u):
    g = g.to(F64)
    return g / (1 + torch.exp(-g)) * u.to(F64)


def attention64(q, k, v, causal, scale=None):
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rope_tables(s, d, b=None, seed=0, dtype=torch.float32):
    """HF-style cos/sin from positions and inv_freq (theta 10000), optionally batched with shifted positions."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=F64) / d))
    pos = torch.arange(s, dtype=F64)
    if b is not None:
        pos = pos[None, :] + torch.arange(b, dtype=F64)[:, None] * 3 + seed   # distinct positions per batch row
    ang = pos[..., None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _max_err(a, b):
    return (a.to(F64) - b.to(F64)).abs().max().item()


# --------------------------------------------------------------------------- forward numerics

shapes_rows = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 70))


@settings(max_examples=15)
@given(shape=shapes_rows, seed=st.integers(0, 2**16))
def test_rms_norm_fp32_matches_float64(shape, seed):
    x = _randn(*shape, seed=seed)
    w = _randn(shape[-1], seed=seed + 1)
    y = ops.rms_norm(x, w, eps=1e-6)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.to(F64), rmsnorm64(x, w, 1e-6), rtol=2e-6, atol=2e-6)


def test_rms_norm_bf16_is_hf_llama_casting():
    # HF LlamaRMSNorm: normalise in fp32, cast to the input dtype, then multiply by the weight (bf16 * bf16).
    x = _randn(4, 7, 96, seed=3, dtype=torch.bfloat16) * 3
    w = _randn(96, seed=4, dtype=torch.bfloat16)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = w * h.to(torch.bfloat16)
    got = ops.rms_norm(x, w)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


@settings(max_examples=15)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3), s=st.integers(1, 9),
       half=st.integers(1, 8), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_apply_rope_fp32_matches_hf_float64(b, hkv, group, s, half, batched, seed):
    d = 2 * half
    q = _randn(b, hkv * group, s, d, seed=seed)
    k = _randn(b, hkv, s, d, seed=seed + 1)
    cos, sin = rope_tables(s, d, b if batched else None, seed=seed % 7)
    q_rot, k_rot = ops.apply_rope(q, k, cos, sin)
    q64, k64 = hf_rope64(q, k, cos, sin)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    torch.testing.assert_close(q_rot.to(F64), q64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_rot.to(F64), k64, rtol=1e-6, atol=1e-6)


def test_apply_rope_bf16_error_at_most_pytorch_bf16_error():
    b, s, d = 2, 64, 128
    q = _randn(b, 4, s, d, seed=5, dtype=torch.bfloat16)
    k = _randn(b, 2, s, d, seed=6, dtype=torch.bfloat16)
    cos, sin = rope_tables(s, d, b, dtype=torch.bfloat16)
    q_rot, k_rot = ops.apply_rope(q, k, cos, sin)
    q64, k64 = hf_rope64(q, k, cos, sin)
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    q_pt = q * c + hf_rotate_half64(q) * sn        # PyTorch's own bf16 evaluation of HF's formula
    k_pt = k * c + hf_rotate_half64(k) * sn
    assert q_rot.dtype == torch.bfloat16
    assert _max_err(q_rot, q64) <= 2 * _max_err(q_pt, q64)
    assert _max_err(k_rot, k64) <= 2 * _max_err(k_pt, k64)


@settings(max_examples=15)
@given(shape=shapes_rows, seed=st.integers(0, 2**16))
def test_swiglu_fp32_matches_float64(shape, seed):
    g = _randn(*shape, seed=seed) * 4
    u = _randn(*shape, seed=seed + 1)
    out = ops.swiglu(g, u)
    assert out.dtype == torch.float32 and out.shape == g.shape
    torch.testing.assert_close(out.to(F64), swiglu64(g, u), rtol=2e-6, atol=2e-6)


def test_swiglu_bf16_error_at_most_pytorch_bf16_error():
    g = _randn(64, 200, seed=7, dtype=torch.bfloat16) * 4
    u = _randn(64, 200, seed=8, dtype=torch.bfloat16)
    out = ops.swiglu(g, u)
    pt = torch.nn.functional.silu(g) * u
    ref64 = swiglu64(g, u)
    assert out.dtype == torch.bfloat16
    assert _max_err(out, ref64) <= 2 * _max_err(pt, ref64)


@settings(max_examples=12)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), s=st.integers(1, 12),
       d=st.sampled_from([4, 8, 16]), causal=st.booleans(), scaled=st.booleans(), seed=st.integers(0, 2**16))
def test_flash_attention_fp32_matches_float64(b, hkv, group, s, d, causal, scaled, seed):
    q = _randn(b, hkv * group, s, d, seed=seed)
    k = _randn(b, hkv, s, d, seed=seed + 1)
    v = _randn(b, hkv, s, d, seed=seed + 2)
    scale = 0.3 if scaled else None
    out = ops.flash_attention(q, k, v, causal=causal, softmax_scale=scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.to(F64), attention64(q, k, v, causal, scale), rtol=1e-5, atol=1e-5)


def test_flash_attention_bf16_error_at_most_pytorch_bf16_error():
    q = _randn(1, 8, 128, 64, seed=9, dtype=torch.bfloat16)
    k = _randn(1, 2, 128, 64, seed=10, dtype=torch.bfloat16)
    v = _randn(1, 2, 128, 64, seed=11, dtype=torch.bfloat16)
    out = ops.flash_attention(q, k, v)
    ref64 = attention64(q, k, v, True)
    pt = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert out.dtype == torch.bfloat16
    assert _max_err(out, ref64) <= 2 * _max_err(pt, ref64)


def test_flash_attention_row_blocks_agree(monkeypatch):
    # Force many small row blocks (incl. a block that straddles two q heads of a group) and compare.
    q = _randn(2, 6, 10, 8, seed=12)
    k = _randn(2, 2, 10, 8, seed=13)
    v = _randn(2, 2, 10, 8, seed=14)
    monkeypatch.setattr(reference, "_BLOCK_BYTES", 2 * 2 * 10 * 4 * 7)   # 7 rows per block
    assert len(reference._row_blocks(2, 2, 30, 10, 4)) == 5
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    # The custom op on the reference backend runs the row-blocked reference forward and backward.
    out, _lse = ops._flash_attention_fwd(q, k, v, True, 8 ** -0.5)
    torch.testing.assert_close(out.to(F64), attention64(q, k, v, True), rtol=1e-5, atol=1e-5)
    dout = _randn(*q.shape, seed=15)
    out.backward(dout)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    attention64(q64, k64, v64, True).backward(dout.to(F64))
    for got, exp in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.to(F64), exp, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- backward numerics

def _grads_vs_float64(fn, fn64, inputs, seed):
    """Gradients of the fp32 op against autograd of the independent float64 formula."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    douts = [_randn(*o.shape, seed=seed + i) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, douts)
    x64 = [t.detach().to(F64).requires_grad_() for t in inputs]
    out64 = fn64(*x64)
    outs64 = out64 if isinstance(out64, tuple) else (out64,)
    torch.autograd.backward(outs64, [d.to(F64) for d in douts])
    for a, b in zip(xs, x64):
        torch.testing.assert_close(a.grad.to(F64), b.grad, rtol=1e-5, atol=1e-5)


def test_backward_fp32_against_float64_formulas():
    x, w = _randn(3, 5, 40, seed=20), _randn(40, seed=21)
    _grads_vs_float64(lambda a, b: ops.rms_norm(a, b, 1e-6), lambda a, b: rmsnorm64(a, b, 1e-6), (x, w), 22)
    g, u = _randn(7, 33, seed=23) * 3, _randn(7, 33, seed=24)
    _grads_vs_float64(ops.swiglu, swiglu64, (g, u), 25)
    q, k = _randn(2, 4, 6, 16, seed=26), _randn(2, 2, 6, 16, seed=27)
    cos, sin = rope_tables(6, 16)
    _grads_vs_float64(lambda a, b: ops.apply_rope(a, b, cos, sin), lambda a, b: hf_rope64(a, b, cos, sin), (q, k), 28)
    v = _randn(2, 2, 6, 16, seed=29)
    _grads_vs_float64(ops.flash_attention, lambda a, b, c: attention64(a, b, c, True), (q, k, v), 30)


def _req(*ts):
    return tuple(t.detach().to(F64).requires_grad_() for t in ts)


def test_gradcheck_rms_norm_float64():
    x, w = _req(_randn(2, 3, 12, seed=40), _randn(12, seed=41))
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, w))


def test_gradcheck_swiglu_float64():
    assert torch.autograd.gradcheck(ops.swiglu, _req(_randn(3, 11, seed=42) * 3, _randn(3, 11, seed=43)))


@pytest.mark.parametrize("table_shape", ["SD", "BSD", "1SD"])
def test_gradcheck_apply_rope_float64(table_shape):
    b, s, d = 2, 5, 8
    cos, sin = rope_tables(s, d, b if table_shape == "BSD" else None, dtype=F64)
    if table_shape == "1SD":
        cos, sin = cos[None], sin[None]
    q, k, cos, sin = _req(_randn(b, 4, s, d, seed=44), _randn(b, 2, s, d, seed=45), cos, sin)
    # cos/sin require grad too: their (rarely used) gradients are checked as well.
    assert torch.autograd.gradcheck(ops.apply_rope, (q, k, cos, sin))


@pytest.mark.parametrize("causal,hq,hkv", [(True, 4, 2), (False, 4, 2), (True, 3, 3), (False, 4, 1)])
def test_gradcheck_flash_attention_float64(causal, hq, hkv):
    q, k, v = _req(_randn(2, hq, 5, 4, seed=46), _randn(2, hkv, 5, 4, seed=47), _randn(2, hkv, 5, 4, seed=48))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attention(a, b, c, causal=causal), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tables_grad", [False, True])
def test_reference_fast_paths_equal_custom_ops(dtype, tables_grad):
    """The reference backend's autograd.Functions (ops.rms_norm / ops.apply_rope without custom-op dispatch)
    give the custom ops' forward and backward bit for bit: same reference functions, wired the same way."""
    x, w, dy = _randn(2, 5, 16, seed=80, dtype=dtype), _randn(16, seed=81, dtype=dtype), _randn(2, 5, 16, seed=82)
    q, k = _randn(2, 4, 5, 8, seed=83, dtype=dtype), _randn(2, 2, 5, 8, seed=84, dtype=dtype)
    dq, dk = _randn(2, 4, 5, 8, seed=85, dtype=dtype), _randn(2, 2, 5, 8, seed=86, dtype=dtype)
    cos, sin = rope_tables(5, 8, dtype=dtype)

    def run(rms, rope):
        xs, ws, qs, ks = (t.clone().requires_grad_() for t in (x, w, q, k))
        cs, ss = (t.clone().requires_grad_(tables_grad) for t in (cos, sin))
        y = rms(xs, ws)
        qr, kr = rope(qs, ks, cs, ss)
        torch.autograd.backward((y, qr, kr), (dy.to(dtype), dq, dk))
        grads = [t.grad for t in (xs, ws, qs, ks)] + ([cs.grad, ss.grad] if tables_grad else [])
        return [y, qr, kr] + grads

    fast = run(lambda a, b: ops.rms_norm(a, b, 1e-5), ops.apply_rope)
    custom = run(lambda a, b: ops._rms_norm_fwd(a, b, 1e-5)[0], ops._rope_fwd)
    for a, b in zip(fast, custom):
        assert a.dtype == b.dtype and torch.equal(a, b)


# --------------------------------------------------------------------------- opcheck

def _g(t):
    return t.detach().clone().requires_grad_()


def _opcheck_cases():
    x, w = _randn(3, 4, 16, seed=50), _randn(16, seed=51)
    rstd = torch.rsqrt((x * x).mean(-1) + 1e-5)
    q, k = _randn(2, 4, 6, 8, seed=52), _randn(2, 2, 6, 8, seed=53)
    v = _randn(2, 2, 6, 8, seed=54)
    cos, sin = rope_tables(6, 8)
    g, u = _randn(5, 24, seed=55), _randn(5, 24, seed=56)
    out, lse = reference.flash_attention_ref(q, k, v, True, 0.35)
    # Hugging Face hands q/k/v over as [B,S,H,D] -> [B,H,S,D] transposed views: non-contiguous inputs.
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    return [
        ("rope_fwd_strided", ops._rope_fwd, (_g(qt), _g(kt), cos, sin)),
        ("flash_attention_fwd_strided", ops._flash_attention_fwd, (_g(qt), _g(kt), _g(vt), True, 0.35)),
        ("swiglu_fwd_strided", ops._swiglu_fwd, (_g(g.t()), _g(u.t()))),
        ("rms_norm_fwd", ops._rms_norm_fwd, (_g(x), _g(w), 1e-5)),
        ("rms_norm_bwd", ops._rms_norm_bwd, (_randn(3, 4, 16, seed=57), x, w, rstd)),
        ("rope_fwd", ops._rope_fwd, (_g(q), _g(k), cos, sin)),
        ("rope_fwd_tables_grad", ops._rope_fwd, (_g(q), _g(k), _g(cos), _g(sin))),
        ("rope_bwd", ops._rope_bwd, (q, k, cos, sin)),
        ("swiglu_fwd", ops._swiglu_fwd, (_g(g), _g(u))),
        ("swiglu_bwd", ops._swiglu_bwd, (_randn(5, 24, seed=58), g, u)),
        ("flash_attention_fwd", ops._flash_attention_fwd, (_g(q), _g(k), _g(v), True, 0.35)),
        ("flash_attention_fwd_noncausal", ops._flash_attention_fwd, (_g(q), _g(k), _g(v), False, 0.35)),
        ("flash_attention_bwd", ops._flash_attention_bwd, (_randn(*q.shape, seed=59), q, k, v, out, lse, True, 0.35)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- backend selection

def test_default_backend_is_reference_on_cpu():
    assert ops.get_backend() == "reference"
    assert ops.get_backend(torch.zeros(1)) == "reference"


def test_use_backend_sets_and_restores():
    with ops.use_backend("sim"):
        assert ops.get_backend(torch.zeros(1)) == "sim"
        with ops.use_backend("reference"):
            assert ops.get_backend() == "reference"
        assert ops.get_backend() == "sim"
    assert ops.get_backend() == "reference"
    with pytest.raises(RuntimeError):
        with ops.use_backend("sim"):
            raise RuntimeError("boom")
    assert ops.get_backend() == "reference"


@pytest.mark.parametrize("select", [ops.use_backend, ops.set_backend])
def test_unknown_backend_is_an_error(select):
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*reference, sim, nki"):
        with contextlib_wrap(select("triton")):
            pass


def contextlib_wrap(obj):
    # set_backend returns None, use_backend a context manager: make both usable in `with`.
    return obj if hasattr(obj, "__enter__") else contextlib.nullcontext()


def test_env_variable(monkeypatch):
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "sim")
    assert ops._backend_from_env() == "sim"
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "")
    assert ops._backend_from_env() is None
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"LLAMA_KERNELS_BACKEND.*valid names are reference, sim, nki"):
        ops._backend_from_env()


def test_env_variable_read_at_import():
    code = "import kernels.ops as o, torch; print(o.get_backend(torch.zeros(1)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, LLAMA_KERNELS_BACKEND="sim")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "sim"


def test_nki_backend_requires_real_nki(monkeypatch):
    monkeypatch.setattr(ops, "_nki_checked", False)
    monkeypatch.setitem(sys.modules, "kernels.nki_compat", types.SimpleNamespace(BACKEND="sim"))
    with pytest.raises(RuntimeError, match="real NKI package"):
        with ops.use_backend("nki"):
            pass
    # With the real package present, CPU tensors are still refused by the nki backend.
    monkeypatch.setitem(sys.modules, "kernels.nki_compat", types.SimpleNamespace(BACKEND="nki"))
    with ops.use_backend("nki"):
        with pytest.raises(ValueError, match="needs XLA"):
            ops.swiglu(torch.zeros(2, 2), torch.zeros(2, 2))


def test_backend_logged_once(caplog):
    monkey = ops._logged.copy()
    ops._logged.clear()
    try:
        with caplog.at_level(logging.INFO, logger="kernels.ops"):
            for _ in range(3):
                ops.swiglu(torch.ones(2, 3), torch.ones(2, 3))
        msgs = [r.getMessage() for r in caplog.records if "backend 'reference' active" in r.getMessage()]
        assert len(msgs) == 1
    finally:
        ops._logged.clear()
        ops._logged.update(monkey)


def test_attention_on_sim_runs_the_nki_kernels():
    from kernels.sim import trace
    q, k, v = (_randn(1, 4, 8, 16, seed=60).requires_grad_(), _randn(1, 2, 8, 16, seed=61).requires_grad_(),
               _randn(1, 2, 8, 16, seed=62).requires_grad_())
    dout = _randn(1, 4, 8, 16, seed=63)
    with ops.use_backend("sim"), trace.record() as tr:
        out = ops.flash_attention(q, k, v)
        out.backward(dout)
    assert tr.counts_by_op()["nc_matmul"] > 0          # forward and backward ran on the interpreter
    torch.testing.assert_close(out.detach().to(F64), attention64(q, k, v, True), rtol=1e-5, atol=1e-5)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    attention64(q64, k64, v64, True).backward(dout.to(F64))
    for got, exp in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.to(F64), exp, rtol=1e-5, atol=1e-5)


def test_float64_refused_off_reference():
    with ops.use_backend("sim"):
        with pytest.raises(ValueError, match="backend 'sim' supports float32 and bfloat16"):
            ops.swiglu(torch.zeros(2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64))


def _empty_cases():
    """(name, inputs builder, op) with a zero batch or zero rows: a kernel has no empty launch grid."""
    return [
        ("rms_norm", lambda: (_randn(0, 5, 8), _randn(8, seed=1)), lambda x, w: ops.rms_norm(x, w)),
        ("swiglu", lambda: (_randn(3, 0, 8), _randn(3, 0, 8, seed=1)), ops.swiglu),
        ("apply_rope", lambda: (_randn(0, 2, 4, 8), _randn(0, 1, 4, 8, seed=1), _randn(4, 8, seed=2),
                                _randn(4, 8, seed=3)), lambda q, k, c, s: sum(ops.apply_rope(q, k, c, s))),
        ("flash_attention b=0", lambda: (_randn(0, 2, 4, 8), _randn(0, 1, 4, 8, seed=1), _randn(0, 1, 4, 8, seed=2)),
         ops.flash_attention),
        ("flash_attention s=0", lambda: (_randn(1, 2, 0, 8), _randn(1, 1, 0, 8, seed=1), _randn(1, 1, 0, 8, seed=2)),
         ops.flash_attention),
    ]


@pytest.mark.parametrize("name,make,op", _empty_cases(), ids=[c[0] for c in _empty_cases()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch_on_sim_behaves_like_reference(name, make, op, dtype):
    """Forward and backward of an empty batch: the same empty output and the same (zero or empty) gradients on the
    sim backend as on the reference, instead of an error from inside the interpreter."""
    results = {}
    for backend in ("reference", "sim"):
        args = [t.to(dtype).requires_grad_() for t in make()]
        with ops.use_backend(backend):
            out = op(*args)
            out.sum().backward()
        results[backend] = (out.detach(), [a.grad for a in args])
    (out_r, g_r), (out_s, g_s) = results["reference"], results["sim"]
    assert out_s.shape == out_r.shape and out_s.dtype == out_r.dtype and out_r.numel() == 0
    for a, b in zip(g_r, g_s):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)      # weight grads of an empty batch are zeros


def test_model_forward_backward_on_an_empty_batch():
    """The model itself takes a zero batch or zero-length sequences on both backends (no -1 reshape of 0 elements),
    giving empty logits and, for a sum loss, zero gradients."""
    from llama import Llama, LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_seq_len=16)
    for backend in ("reference", "sim"):
        for shape in ((0, 8), (2, 0)):
            torch.manual_seed(0)
            model = Llama(cfg)
            ids = torch.zeros(shape, dtype=torch.long)
            with ops.use_backend(backend):
                assert model(ids).shape == (*shape, cfg.vocab_size)
                model(ids, labels=ids, reduction="sum").backward()
            assert all(p.grad is None or not p.grad.any() for p in model.parameters()), (backend, shape)


# --------------------------------------------------------------------------- validation

def _bad_calls():
    z = torch.zeros
    cos, sin = z(4, 8), z(4, 8)
    return [
        ("rms weight shape", lambda: ops.rms_norm(z(2, 8), z(7)), r"weight has shape \(7,\), expected \(8,\)"),
        ("rms weight rank", lambda: ops.rms_norm(z(2, 8), z(1, 8)), r"weight has shape \(1, 8\)"),
        ("rms eps", lambda: ops.rms_norm(z(2, 8), z(8), eps=0.0), r"eps must be > 0"),
        ("rms int", lambda: ops.rms_norm(z(2, 8, dtype=torch.int32), z(8)), r"x has dtype torch.int32"),
        ("rope rank", lambda: ops.apply_rope(z(4, 8), z(1, 1, 4, 8), cos, sin), r"must be 4-D"),
        ("rope odd d", lambda: ops.apply_rope(z(1, 2, 4, 7), z(1, 1, 4, 7), z(4, 7), z(4, 7)), r"head_dim 7"),
        ("rope big d", lambda: ops.apply_rope(z(1, 2, 4, 130), z(1, 1, 4, 130), z(4, 130), z(4, 130)),
         r"head_dim 130.*<= 128"),
        ("rope k seq", lambda: ops.apply_rope(z(1, 2, 4, 8), z(1, 1, 5, 8), cos, sin), r"k \(1, 1, 5, 8\) must match"),
        ("rope table", lambda: ops.apply_rope(z(1, 2, 4, 8), z(1, 1, 4, 8), z(5, 8), sin), r"cos has shape \(5, 8\)"),
        ("swiglu shape", lambda: ops.swiglu(z(2, 3), z(3, 2)), r"gate \(2, 3\) and up \(3, 2\)"),
        ("swiglu dtype", lambda: ops.swiglu(z(2, 3), z(2, 3, dtype=torch.bfloat16)), r"dtype torch.float32 differs"),
        ("attn gqa", lambda: ops.flash_attention(z(1, 3, 4, 8), z(1, 2, 4, 8), z(1, 2, 4, 8)),
         r"query heads 3.*multiple of kv heads 2"),
        ("attn kv", lambda: ops.flash_attention(z(1, 2, 4, 8), z(1, 2, 4, 8), z(1, 1, 4, 8)), r"k .* and v .* same shape"),
        ("attn seq", lambda: ops.flash_attention(z(1, 2, 4, 8), z(1, 2, 5, 8), z(1, 2, 5, 8)), r"Sq == Sk"),
        ("attn rank", lambda: ops.flash_attention(z(2, 4, 8), z(2, 4, 8), z(2, 4, 8)), r"must be 4-D"),
    ]


@pytest.mark.parametrize("name,call,pattern", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_validation_errors(name, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
