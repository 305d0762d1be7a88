"""Native stochastic rounding and fused AdamW-SR (kernels/native) against training/precision.py and float64.

The random bits are counter-based (kernels/native/counter_rng.h) and training.precision.sr_bits is the same
function in PyTorch, so the native SR cast equals the PyTorch SR cast bit for bit. The fused AdamW step repeats
SRAdamW's fp32 op order; its moments equal PyTorch's bit for bit, and its bf16 parameters equal the PyTorch
composite except where torch's own sqrt (MKL VML, not always correctly rounded) differs by an fp32 ulp and the
random bits fall exactly on that boundary (about 2^-16 of those elements). Statistical bounds are 6 standard
deviations (false-failure probability ~1e-9 per check; the inputs are seeded, so the tests are deterministic).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.native_helpers import isa, require_native, threads
from training.precision import sr_bits, sr_tensor_key, stochastic_round_bf16

OPS = torch.ops.llama_kernels


@pytest.fixture(scope="module", autouse=True)
def _native():
    return require_native()


def _i16(t):
    return t.contiguous().view(torch.int16)


def _specials():
    t = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 3.3961e38, -3.3961e38,
                      1e-40, -1e-45])
    low_nan = torch.tensor([0x7F800001, -1], dtype=torch.int32).view(torch.float32)   # payload in low bits / 0xFFFFFFFF
    return torch.cat([t, low_nan])


# --------------------------------------------------------------------------- the SR cast

@settings(max_examples=40)
@given(n=st.integers(0, 3000), key=st.integers(0, 2 ** 63 - 1), scale=st.sampled_from([1e-30, 1.0, 1e4, 1e38]))
def test_sr_cast_bitwise_equal_to_pytorch(n, key, scale):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    x = torch.cat([x, _specials()])
    got = OPS.native_sr_bf16(x, key)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(_i16(got), _i16(stochastic_round_bf16(x, key=key)))


def test_sr_cast_non_contiguous_zero_size_and_bad_input():
    x = torch.randn(37, 53)
    for view in (x.t(), x[:, ::3], x[5:9, 1:2]):
        assert torch.equal(_i16(OPS.native_sr_bf16(view, 9)), _i16(OPS.native_sr_bf16(view.contiguous(), 9)))
        assert torch.equal(_i16(OPS.native_sr_bf16(view, 9)), _i16(stochastic_round_bf16(view, key=9)))
    for shape in ((0,), (4, 0)):
        assert OPS.native_sr_bf16(torch.empty(shape), 1).shape == shape
    with pytest.raises(RuntimeError, match="float32"):
        OPS.native_sr_bf16(torch.ones(3, dtype=torch.bfloat16), 1)


@pytest.mark.parametrize("lo", [1.0, -3.5, 1e-20, 6.0e4])
@pytest.mark.parametrize("frac", [0.01, 0.3, 0.77])
def test_sr_round_up_probability_is_the_fractional_position(lo, frac):
    lo = float(torch.tensor(lo).to(torch.bfloat16))
    away = math.copysign(2.0 ** (math.floor(math.log2(abs(lo))) - 7), lo)
    n = 200_000
    xs = torch.full((n,), lo + frac * away, dtype=torch.float32)
    p_true = (float(xs[0]) - lo) / away
    r = OPS.native_sr_bf16(xs, sr_tensor_key(3, 1, 0, 0)).double()
    assert set(torch.unique(r).tolist()) <= {lo, lo + away}
    p_hat = float((r == lo + away).double().mean())
    sigma = math.sqrt(p_true * (1 - p_true) / n)
    assert abs(p_hat - p_true) < 6 * sigma
    assert abs(float(r.mean()) - float(xs[0])) < 6 * sigma * abs(away)       # unbiased


def _joint_up(u, i, j):
    """P(element i and element j both round up) estimated over many (i, j) pairs."""
    return float((u[i] & u[j]).double().mean())


def test_sr_rounding_is_independent_across_elements_and_steps():
    n, p = 400_000, 0.5
    x = torch.full((n,), 1.0 + p * 2 ** -7, dtype=torch.float32)
    ups = [OPS.native_sr_bf16(x, sr_tensor_key(11, step, 0, 0)) > 1.0 for step in (1, 2)]
    u = ups[0]
    even = torch.arange(0, n - 2, 2)
    odd = torch.arange(1, n - 2, 2)
    pairs = {"same hash (2c, 2c+1)": (even, even + 1), "across hashes (2c+1, 2c+2)": (odd, odd + 1),
             "two apart": (even, even + 2)}
    for name, (i, j) in pairs.items():
        m = i.numel()
        bound = 6 * math.sqrt(p * p * (1 - p * p) / m)
        assert abs(_joint_up(u, i, j) - p * p) < bound, name
    step_joint = float((ups[0] & ups[1]).double().mean())                   # the same element at two steps
    assert abs(step_joint - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n)


def test_sr_bits_are_uniform():
    r = sr_bits(sr_tensor_key(5, 7, 1, 2), 1 << 20)
    assert int(r.min()) >= 0 and int(r.max()) < 1 << 16
    for part in (r & 0xFF, r >> 8):                                         # both bytes of the 16 random bits
        counts = torch.bincount(part, minlength=256).double()
        expected = r.numel() / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2                     # chi-square, 255 degrees of freedom


# --------------------------------------------------------------------------- fused AdamW-SR

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(shape, grad_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g).to(torch.bfloat16)
    grad = (torch.randn(shape, generator=g) * 1e-2).to(grad_dtype)
    m = torch.randn(shape, generator=g) * 1e-3
    v = torch.rand(shape, generator=g) * 1e-5
    return p, grad, m, v


def _composite(p, grad, m, v, t, key, lr, beta1, beta2, eps, weight_decay):
    """training.optim.SRAdamW's PyTorch ops for one tensor (fp32 math, then the SR cast)."""
    g = grad.float()
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p32 = p.float()
    if weight_decay:
        p32.mul_(1 - lr * weight_decay)
    denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
    p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
    p.copy_(stochastic_round_bf16(p32, key=key))


def _fused(p, grad, m, v, t, key, lr, beta1, beta2, eps, weight_decay):
    OPS.native_adamw_sr_(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, 1 - beta1 ** t, 1 - beta2 ** t, key)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_sr_matches_the_pytorch_composite(grad_dtype, weight_decay):
    hp = dict(HP, weight_decay=weight_decay)
    a = _state((1000, 301), grad_dtype, 1)
    b = [t.clone() for t in a]
    for t in (1, 2, 3):
        key = sr_tensor_key(1234, t, 0, 0)
        _fused(*a, t, key, **hp)
        _composite(*b, t, key, **hp)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])              # moments: bit for bit
    differ = _i16(a[0]) != _i16(b[0])
    assert int(differ.sum()) <= max(3, a[0].numel() // 10_000), int(differ.sum())
    gap = (a[0].double() - b[0].double()).abs()[differ]
    ulp = torch.ldexp(torch.ones_like(gap), torch.frexp(b[0].double()[differ])[1] - 8)
    assert bool((gap <= ulp * 1.0001).all())                                # the other bf16 neighbour


def test_adamw_sr_is_an_unbiased_rounding_of_the_float64_update():
    n = 200_000
    p = torch.ones(n, dtype=torch.bfloat16)
    grad = torch.full((n,), 0.3, dtype=torch.bfloat16)
    m, v = torch.zeros(n), torch.zeros(n)
    _fused(p, grad, m, v, 1, sr_tensor_key(5, 1, 0, 0), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
            weight_decay=0.0)
    g = float(grad[0])
    exact = 1.0 - 1e-3 * g / (abs(g) + 1e-8)                                # first step: m_hat = g, v_hat = g^2
    vals = p.double()
    assert set(torch.unique(vals).tolist()) <= {1.0, 1.0 - 2 ** -8}
    p_down = (1.0 - exact) / 2 ** -8
    assert abs(float((vals < 1).double().mean()) - p_down) < 6 * math.sqrt(p_down * (1 - p_down) / n)
    assert abs(float(vals.mean()) - exact) < 6 * math.sqrt(p_down * (1 - p_down) / n) * 2 ** -8


def test_adamw_sr_non_contiguous_zero_size_and_bad_input():
    ct = [t.t() for t in _state((40, 30), torch.bfloat16, 2)]             # non-contiguous [30, 40] views
    d = [t.t().contiguous() for t in _state((40, 30), torch.bfloat16, 2)]  # the same logical tensors, contiguous
    before = ct[0].clone()
    _fused(*ct, 1, 77, **HP)
    _fused(*d, 1, 77, **HP)
    assert not torch.equal(ct[0], before)                                   # updated in place through the view
    for x, y in zip(ct, d):
        assert torch.equal(x, y)                                            # element i = row-major logical index
    z = [torch.empty(0, 5, dtype=torch.bfloat16), torch.empty(0, 5), torch.empty(0, 5), torch.empty(0, 5)]
    _fused(*z, 1, 1, **HP)
    p, grad, m, v = _state((8,), torch.bfloat16, 3)
    with pytest.raises(RuntimeError, match="bfloat16"):
        _fused(p.float(), grad, m, v, 1, 1, **HP)
    with pytest.raises(RuntimeError, match="shape"):
        _fused(p, grad[:4], m, v, 1, 1, **HP)


def test_sr_and_adamw_bitwise_identical_for_threads_and_variants():
    x = torch.randn(1_000_003) * 3
    base = _state((1_000_003,), torch.bfloat16, 4)
    results = []
    for n_threads, variant in ((1, "AVX512"), (2, "AVX512"), (2, "AVX2"), (2, "DEFAULT")):
        with threads(n_threads), isa(variant):
            st_ = [t.clone() for t in base]
            _fused(*st_, 3, 4242, **HP)
            results.append((OPS.native_sr_bf16(x, 99), *st_))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32),
                               b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32))


# --------------------------------------------------------------------------- SRAdamW (training/optim.py)

def _model_params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 257), (257,), (64, 33)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in shapes]


def _train(params, mode, steps, seed=9, resume_at=None, groups=None):
    """SRAdamW over ``params`` with deterministic gradients; ``resume_at``: a fresh optimizer from the state dict."""
    import kernels.native as kn
    from training.optim import SRAdamW

    def make():
        return SRAdamW(groups(params) if groups else params, lr=1e-2, weight_decay=0.1, seed=seed)

    opt = make()
    with kn.use_mode(mode):
        for step in range(steps):
            if step == resume_at:
                sd = opt.state_dict()
                params[:] = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = make()
                opt.load_state_dict(sd)
            g = torch.Generator().manual_seed(1000 + step)
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(torch.bfloat16)
            opt.step()
    return [p.detach().clone() for p in params], opt


def test_sradamw_native_and_pytorch_paths_agree(monkeypatch):
    fused = OPS.native_adamw_sr_
    calls = []
    monkeypatch.setattr(OPS, "native_adamw_sr_", lambda *a: calls.append(1) or fused(*a))
    native_p, native_opt = _train(_model_params(1), "on", 4)
    assert len(calls) == 4 * 3                                               # every step of every tensor fused
    torch_p, torch_opt = _train(_model_params(1), "off", 4)
    assert len(calls) == 4 * 3                                               # --native off: never
    for a, b in zip(native_opt.state.values(), torch_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    total = sum(p.numel() for p in native_p)
    differ = sum(int((_i16(a) != _i16(b)).sum()) for a, b in zip(native_p, torch_p))
    assert differ <= max(3, total // 5000), (differ, total)                 # see the module docstring


def test_sradamw_native_resume_reproduces_the_bits():
    straight, _ = _train(_model_params(2), "on", 6)
    resumed, _ = _train(_model_params(2), "on", 6, resume_at=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(_i16(a), _i16(b))


def test_sradamw_native_bitwise_identical_for_1_and_2_threads():
    params = [torch.nn.Parameter(torch.randn(700_001).to(torch.bfloat16))]
    with threads(1):
        one, _ = _train([torch.nn.Parameter(p.detach().clone()) for p in params], "on", 2)
    with threads(2):
        two, _ = _train([torch.nn.Parameter(p.detach().clone()) for p in params], "on", 2)
    assert torch.equal(_i16(one[0]), _i16(two[0]))


def test_tp_replicas_sharing_a_stream_round_identically():
    from training.precision import SHARED_STREAM, sharded_stream

    def run(tp_rank):
        params = _model_params(3)                                            # same values on both "ranks"

        def groups(ps):                                                      # ps[1]: a replicated norm weight
            return [dict(params=[ps[1]], sr_stream=SHARED_STREAM),
                    dict(params=[ps[0], ps[2]], sr_stream=sharded_stream(tp_rank))]
        return _train(params, "on", 3, groups=groups)[0]

    rank0, rank1 = run(0), run(1)
    assert torch.equal(_i16(rank0[1]), _i16(rank1[1]))                      # replicated: bit-identical copies
    assert not torch.equal(_i16(rank0[0]), _i16(rank1[0]))                  # shards: independent rounding
