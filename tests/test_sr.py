"""Stochastic rounding fp32 -> bf16 (training/precision.py) and the bf16 AdamW that uses it (training/optim.py).

References are float64 math and torch.optim.AdamW; statistical bounds are 6 standard deviations of the binomial
(false-failure probability ~1e-9 per check; the generators are seeded, so the tests are deterministic anyway).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.optim import SRAdamW
from training.precision import sr_seed, stochastic_round_bf16


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


@pytest.mark.parametrize("lo", [1.0, -3.5, 1e-20, 6.0e4])
@pytest.mark.parametrize("frac", [0.01, 0.3, 0.5, 0.77])
def test_sr_unbiased_between_neighbours(lo, frac):
    lo = float(torch.tensor(lo).to(torch.bfloat16))      # start from a bf16 value
    ulp = _bf16_ulp(lo)
    away = math.copysign(ulp, lo)                         # the neighbour further from zero
    x = lo + frac * away
    n = 200_000
    xs = torch.full((n,), x, dtype=torch.float32)
    x32 = float(xs[0])                                    # the fp32 value actually rounded
    p_true = (x32 - lo) / away                            # probability of rounding away from zero
    r = stochastic_round_bf16(xs, _gen(1)).double()
    assert set(torch.unique(r).tolist()) <= {lo, lo + away}
    p_hat = float((r == lo + away).double().mean())
    bound = 6 * math.sqrt(p_true * (1 - p_true) / n)
    assert abs(p_hat - p_true) < bound
    # mean of the casts equals the fp32 value within the same bound (scaled by the gap)
    assert abs(float(r.mean()) - x32) < bound * abs(away) + 1e-12 * abs(x32)


@settings(max_examples=25)
@given(st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda v: abs(v) < 3.38e38))
def test_sr_lands_on_a_neighbour(v):
    x = torch.full((64,), v, dtype=torch.float32)
    r = stochastic_round_bf16(x, _gen(2)).double()
    x64 = float(x[0])
    if x64 == 0.0:
        assert bool((r == 0).all())
        return
    ulp = _bf16_ulp(x64)
    assert bool(((r - x64).abs() < ulp).all())
    assert bool((torch.sign(r) == math.copysign(1.0, x64)).all())


def test_sr_exact_values_and_specials():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.0, 0.15625, 3.3895313892515355e38, float("inf"), float("-inf")],
                         dtype=torch.float32)
    for seed in range(20):
        r = stochastic_round_bf16(exact, _gen(seed))
        assert torch.equal(r.float(), exact)
        assert torch.equal(torch.signbit(r), torch.signbit(exact))
    nans = torch.tensor([float("nan"), -float("nan")], dtype=torch.float32)
    nans_low = torch.tensor([1], dtype=torch.int32).view(torch.float32).clone()
    nans_low.view(torch.int32)[0] = 0x7F800001            # a NaN whose payload is only in the low 16 bits
    assert bool(torch.isnan(stochastic_round_bf16(nans, _gen(0))).all())
    assert bool(torch.isnan(stochastic_round_bf16(nans_low, _gen(0))).all())


def test_sr_overflow_rounds_to_inf_with_the_right_probability():
    big = torch.finfo(torch.bfloat16).max                 # 3.3895e38; next would be 2^128 (inf)
    away = 2.0 ** (127 - 7)
    x = torch.full((100_000,), big + 0.25 * away, dtype=torch.float32)
    r = stochastic_round_bf16(x, _gen(3)).float()
    p_inf = float(torch.isinf(r).double().mean())
    assert abs(p_inf - 0.25) < 6 * math.sqrt(0.25 * 0.75 / 1e5)
    assert bool(((r == big) | torch.isinf(r)).all())


def test_sr_keeps_tiny_updates_that_nearest_loses():
    n, steps, rate = 2000, 1000, 1e-4                    # update 1e-4 << half a bf16 ulp at 1.0 (3.9e-3)
    w_sr = torch.ones(n, dtype=torch.bfloat16)
    w_rne = torch.ones(n, dtype=torch.bfloat16)
    g = _gen(4)
    for _ in range(steps):
        w_sr = stochastic_round_bf16(w_sr.float() * (1 + rate), g)
        w_rne = (w_rne.float() * (1 + rate)).to(torch.bfloat16)
    expected = (1 + rate) ** steps                        # float64 reference: 1.1052
    assert bool((w_rne == 1).all())                       # round-to-nearest never moves
    assert abs(float(w_sr.double().mean()) - expected) < 0.01


def test_sr_seed_is_a_pure_function_and_distinguishes_streams():
    assert sr_seed(1, 2, 0) == sr_seed(1, 2, 0)
    seeds = {sr_seed(s, t, k) for s in range(3) for t in range(50) for k in range(4)}
    assert len(seeds) == 3 * 50 * 4
    x = torch.rand(1000) + 1
    g1, g2 = torch.Generator(), torch.Generator()
    g1.manual_seed(sr_seed(7, 3, 0))
    g2.manual_seed(sr_seed(7, 3, 0))
    assert torch.equal(stochastic_round_bf16(x, g1), stochastic_round_bf16(x, g2))


def test_sr_adamw_fp32_matches_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(7, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = SRAdamW([p1], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    o2 = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for i in range(5):
        g = torch.randn(7, 5)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_sr_adamw_bf16_is_an_unbiased_rounding_of_the_fp64_update():
    n = 100_000
    w0 = torch.full((n,), 1.0, dtype=torch.bfloat16)
    p = torch.nn.Parameter(w0.clone())
    p.grad = torch.full((n,), 0.3, dtype=torch.bfloat16)
    opt = SRAdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, seed=5)
    opt.step()
    # float64 AdamW, first step: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps)
    g = float(torch.tensor(0.3, dtype=torch.bfloat16))
    ref = 1.0 - 1e-3 * g / (abs(g) + 1e-8)
    vals = p.detach().double()
    assert set(torch.unique(vals).tolist()) <= {1.0, 1.0 - 2 ** -8}   # the two bf16 neighbours below/at 1
    p_down = (1.0 - ref) / 2 ** -8
    assert abs(float((vals < 1).double().mean()) - p_down) < 6 * math.sqrt(p_down * (1 - p_down) / n)
    assert opt.param_groups[0]["sr_step"] == 1


def test_sr_adamw_resumes_bitwise_from_state_dict():
    torch.manual_seed(1)
    base = torch.randn(300).to(torch.bfloat16)
    grads = [torch.randn(300).to(torch.bfloat16) for _ in range(6)]

    def run(split):
        p = torch.nn.Parameter(base.clone())
        opt = SRAdamW([p], lr=1e-2, weight_decay=0.1, seed=9)
        for i, g in enumerate(grads):
            if i == split:                                   # "resume": a fresh optimizer from the state dict
                sd = opt.state_dict()
                p = torch.nn.Parameter(p.detach().clone())
                opt = SRAdamW([p], lr=1e-2, weight_decay=0.1, seed=9)
                opt.load_state_dict(sd)
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(None), run(3))
