"""Property tests of the flash-attention NKI kernels (kernels/attention.py) run by the interpreter (backend "sim").

Independent reference: textbook attention in PyTorch autograd (scores = q k^T * scale, -inf causal mask,
softmax, P @ v; GQA by repeating K/V in the reference only), run in float64 (truth) and in the kernel's dtype
(PyTorch's own error); lse = torch.logsumexp of the scaled scores. Criterion in tests/kernel_helpers.py:
kernel max error <= 2x PyTorch's max error in the same dtype (with an fp32-ulp floor).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention
from kernels.sim import memory, trace
from kernel_helpers import DTYPES, assert_close_2x, randn

HEADS = [(1, 1), (4, 2), (4, 1), (8, 2)]


def scaled_scores(q, k, v, causal, scale):
    """(group, K and V repeated to the query heads, scaled scores with -inf above the diagonal when causal)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return group, kk, vv, s


def torch_attention(q, k, v, do, causal, scale):
    """(o, lse, dq, dk, dv) by plain PyTorch ops and autograd, all in q's dtype."""
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    _, kk, vv, s = scaled_scores(qr, kr, vr, causal, scale)
    o = torch.matmul(torch.softmax(s, dim=-1), vv)
    lse = torch.logsumexp(s, dim=-1)
    o.backward(do)
    return o.detach(), lse.detach(), qr.grad, kr.grad, vr.grad


def term_scales(q, k, v, do, causal, scale):
    """Magnitude of the terms each output combines (float64), for the fp32 floor of kernel_helpers: an fp32 sum
    cannot be more accurate than a few ulps of sum |terms| (and dS = P * (dP - Dlt) cancels before the sums)."""
    q, k, v, do = (t.double() for t in (q, k, v, do))
    group, kk, vv, s = scaled_scores(q, k, v, causal, scale)
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vv)
    dp = torch.matmul(do, vv.transpose(-1, -2))
    dlt = (do * o).sum(-1, keepdim=True)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    # The backward recomputes P = exp(c*s - lse) from the saved lse: its fp32 exponent argument is rounded at the
    # magnitude |c*s| + |lse|, a relative error of P that every gradient inherits; and dS = P * (dP - Dlt)
    # cancels before it is summed. Weight of each (query, key) term: P (1 + |c*s| + |lse|) (|dP| + |Dlt|).
    arg = torch.where(p > 0, s.abs() + lse.abs(), torch.zeros_like(s))
    w = p * (1 + arg) * (dp.abs() + dlt.abs())

    def per_kv(x):                                      # sum the group's query heads onto their kv head
        return x.reshape(k.shape[0], k.shape[1], group, *x.shape[2:]).sum(2)
    return dict(o=torch.matmul(p, vv.abs()).max().item(),
                lse=max(lse.abs().max().item(), s[torch.isfinite(s)].abs().max().item()),
                dq=scale * torch.matmul(w, kk.abs()).max().item(),
                dk=scale * per_kv(torch.matmul(w.transpose(-1, -2), q.abs())).max().item(),
                dv=per_kv(torch.matmul((p * (1 + arg)).transpose(-1, -2), do.abs())).max().item())


def make_inputs(b, hq, hkv, s, d, dtype, seed):
    return (randn((b, hq, s, d), dtype, seed), randn((b, hkv, s, d), dtype, seed + 1),
            randn((b, hkv, s, d), dtype, seed + 2), randn((b, hq, s, d), dtype, seed + 3))


def run_and_check(q, k, v, do, causal, softmax_scale=None, prefix=""):
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    o, lse = attention.flash_attention_fwd(q, k, v, causal, softmax_scale)
    dq, dk, dv = attention.flash_attention_bwd(q, k, v, o, do, lse, causal, softmax_scale)
    ref64 = torch_attention(*(t.double() for t in (q, k, v, do)), causal, scale)
    ref_pt = torch_attention(q, k, v, do, causal, scale)
    assert lse.dtype == torch.float32
    scales = term_scales(q, k, v, do, causal, scale)
    # lse: PyTorch's own lse is in q.dtype; the kernel's is fp32 (compared in fp32 against PyTorch's value).
    for name, out, r64, rpt in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref64, ref_pt):
        assert_close_2x(prefix + name, out, r64, rpt.to(out.dtype) if name == "lse" else rpt,
                        scales[name])


@settings(max_examples=20)
@given(b=st.integers(1, 2), heads=st.sampled_from(HEADS), s=st.sampled_from([128, 256, 200, 72, 300, 700]),
       d=st.sampled_from([32, 64, 128]), dtype=st.sampled_from(DTYPES), causal=st.booleans(),
       scale=st.sampled_from([None, 0.5]), seed=st.integers(0, 2**16))
def test_fwd_bwd_match_float64(b, heads, s, d, dtype, causal, scale, seed):
    hq, hkv = heads
    run_and_check(*make_inputs(b, hq, hkv, s, d, dtype, seed), causal, scale)


def launch_counts(q, k, v, do, causal):
    """Per direction and score pass: (query, key) pairs the score matmuls compute (stationary free size times
    moving free size, whichever side holds the keys) and the masked diagonal sub-blocks of that pass."""
    with trace.record() as tr:
        o, lse = attention.flash_attention_fwd(q, k, v, causal)
    fwd = tr.instructions
    with trace.record() as tr:
        attention.flash_attention_bwd(q, k, v, o, do, lse, causal)
    passes = {"fwd": (("scores", "causal_mask"), ("scores_t", "causal_mask_p")),
              "bwd": (("scores", "causal_mask"),)}
    out = {}
    for direction, instrs in (("fwd", fwd), ("bwd", tr.instructions)):
        for matmul, mask in passes[direction]:
            pairs = sum(ins.operand("stationary").shape[-1] * ins.operand("moving").shape[-1]
                        for ins in instrs if ins.name == matmul)
            out[direction, matmul] = (pairs, sum(1 for ins in instrs if ins.name == mask))
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_causal_blocks_above_the_diagonal_are_skipped(causal):
    """The score matmuls of query tile i (rows q0..q0+rows) cover keys 0..q0+rows only (not masked, never
    computed), and only the diagonal 128 x 128 sub-block is masked: once per query tile."""
    b, hq, hkv, s, d = 1, 2, 1, 1100, 32
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.bfloat16, 5)
    tiles = [(q0, min(128, s - q0)) for q0 in range(0, s, 128)]
    want_pairs = b * hq * (sum(rows * (q0 + rows) for q0, rows in tiles) if causal else s * s)
    want_masks = b * hq * len(tiles) if causal else 0
    want = (want_pairs, want_masks)
    got = launch_counts(q, k, v, do, causal)
    # both forward passes (query-major row max, key-major exp) and the backward's scores
    assert got == {("fwd", "scores"): want, ("fwd", "scores_t"): want, ("bwd", "scores"): want}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_several_key_blocks_and_query_chunks(causal, dtype):
    """S = 2200: the forward's pass 1 takes the row max over five 512-key blocks and pass 2 runs five 512-row
    query chunks, the backward runs nine 256-key blocks and three 1024-row query chunks (double-buffered), with a
    24-row tail tile."""
    run_and_check(*make_inputs(1, 2, 1, 2200, 64, dtype, 11), causal)


def test_hbm_bytes_are_minimal():
    """Every input byte is read once and every output byte written once: in particular K and V are read once
    per kv head, not once per query head (no repeat of K/V for GQA)."""
    b, hq, hkv, s, d = 2, 8, 2, 300, 64
    q, k, v, do = make_inputs(b, hq, hkv, s, d, torch.bfloat16, 0)
    q_bytes, kv_bytes, lse_bytes = 2 * b * hq * s * d, 2 * b * hkv * s * d, 4 * b * hq * s
    with trace.record() as tr:
        o, lse = attention.flash_attention_fwd(q, k, v)
    assert tr.hbm_bytes() == (q_bytes + 2 * kv_bytes, q_bytes + lse_bytes)
    with trace.record() as tr:
        attention.flash_attention_bwd(q, k, v, o, do, lse)
    assert tr.hbm_bytes() == (3 * q_bytes + 2 * kv_bytes + lse_bytes, q_bytes + 2 * kv_bytes)


def test_llama_7b_per_rank_shape_passes_trn1_checks():
    """Llama 2 7B per TP rank at TP=8 with GQA exercised: 4 query heads on 1 kv head, D = 128, bf16, causal,
    S = 512 (short for the test budget). The interpreter checks trn1's rules and SBUF/PSUM capacity on every
    instruction; results against float64 with the 2x criterion."""
    run_and_check(*make_inputs(1, 4, 1, 512, 128, torch.bfloat16, 3), True, prefix="7b ")
    peak = memory.peak_bytes()
    assert peak["sbuf"] <= memory.SBUF_BYTES_PER_PARTITION and peak["psum"] <= memory.PSUM_BYTES_PER_PARTITION


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_longest_supported_sequence_fits_trn1(dtype):
    """At S = MAX_SEQ[dtype] (D = 128) both kernels stay inside trn1's SBUF and PSUM (the interpreter raises
    CapacityError otherwise). Causal, so the first 256 query rows depend on the first 256 keys only: their o,
    lse and dq are checked with the 2x criterion against the same rows of a float64 reference."""
    s = attention.MAX_SEQ[str(dtype).replace("torch.", "")]
    q, k, v, do = make_inputs(1, 1, 1, s, 128, dtype, 7)
    o, lse = attention.flash_attention_fwd(q, k, v)
    dq, _, _ = attention.flash_attention_bwd(q, k, v, o, do, lse)
    n = 256
    part = [t[:, :, :n].contiguous() for t in (q, k, v, do)]
    scale = 1.0 / math.sqrt(128)
    ref64 = torch_attention(*(t.double() for t in part), True, scale)
    ref_pt = torch_attention(*part, True, scale)
    scales = term_scales(*part, True, scale)
    for name, out, idx in (("o", o, 0), ("lse", lse, 1), ("dq", dq, 2)):
        rpt = ref_pt[idx].to(out.dtype) if name == "lse" else ref_pt[idx]
        assert_close_2x(f"S={s} {name}", out[:, :, :n], ref64[idx], rpt, scales[name])


BAD = {
    "dtype": lambda q, k, v: (q.half(), k.half(), v.half()),
    "rank": lambda q, k, v: (q[0], k[0], v[0]),
    "kv_dtype": lambda q, k, v: (q, k.bfloat16(), v),
    "kv_shape": lambda q, k, v: (q, k, v[:, :, :8]),
    "seq_mismatch": lambda q, k, v: (q, k[:, :, :8], v[:, :, :8]),
    "gqa_groups": lambda q, k, v: (q[:, :3], k, v),
    "head_dim": lambda q, k, v: (torch.zeros(1, 4, 16, 160), torch.zeros(1, 2, 16, 160), torch.zeros(1, 2, 16, 160)),
    "seq_too_long": lambda q, k, v: (torch.zeros(1, 1, 4097, 8), torch.zeros(1, 1, 4097, 8),
                                     torch.zeros(1, 1, 4097, 8)),
    "empty": lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]),
}


@pytest.mark.parametrize("bad", [*BAD, "scale", "o_shape", "do_dtype", "lse_shape", "lse_dtype"])
def test_unsupported_inputs_raise_before_launch(bad):
    q, k, v, do = make_inputs(1, 4, 2, 16, 8, torch.float32, 0)
    lse = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError) as exc, trace.record() as tr:
        if bad in BAD:
            attention.flash_attention_fwd(*BAD[bad](q, k, v))
        elif bad == "scale":
            attention.flash_attention_fwd(q, k, v, softmax_scale=-1.0)
        elif bad == "o_shape":
            attention.flash_attention_bwd(q, k, v, q[:, :, :8], do, lse)
        elif bad == "do_dtype":
            attention.flash_attention_bwd(q, k, v, q, do.bfloat16(), lse)
        elif bad == "lse_shape":
            attention.flash_attention_bwd(q, k, v, q, do, lse[..., :8])
        elif bad == "lse_dtype":
            attention.flash_attention_bwd(q, k, v, q, do, lse.double())
    assert len(tr.instructions) == 0, "the kernel was launched"
    msg = str(exc.value)
    assert msg.startswith("kernels/attention.py: ")
    expect = {"head_dim": ("160", "128"), "seq_too_long": ("4097", "4096"), "gqa_groups": ("3", "2"),
              "dtype": ("float16",), "scale": ("-1.0",), "lse_dtype": ("float64", "float32")}
    for part in expect.get(bad, ()):
        assert part in msg, (bad, msg)


# Poison for the keys at and after position `cut`: Inf/NaN keys, and a huge finite key whose scores overflow to
# +-Inf / NaN in the fp32 accumulation (finite K, so the backward's dq = dS @ K stays well defined: dS is an
# exact 0 there). Every query row before `cut` has all of them in its masked region.
POISON = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "huge": 1e38}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # numpy's overflow notes for the intended Inf scores
@settings(max_examples=12, deadline=None)
@given(backend=st.sampled_from(["reference", "sim"]), dtype=st.sampled_from(DTYPES),
       heads=st.sampled_from([(1, 1), (2, 1)]), s=st.sampled_from([40, 130, 200]),
       poison=st.sampled_from(list(POISON)), frac=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_masked_keys_never_contribute_whatever_their_value(backend, dtype, heads, s, poison, frac, seed):
    """Causal attention, keys from `cut` on set to a non-finite (or overflowing) value: the query rows before `cut`
    (which mask those keys) are finite and equal, within the dtype's 2x criterion, to float64 attention of the
    clean prefix; so is dq of those rows when K stays finite (huge); the ops are run through kernels.ops on both
    backends. Before the select the sim kernel added -1e30 to masked scores: Inf + -1e30 = Inf -> NaN rows."""
    from kernels import ops
    hq, hkv = heads
    cut = max(1, min(s - 1, int(frac * s)))
    q, k, v, do = make_inputs(1, hq, hkv, s, 16, dtype, seed)
    k = k.clone()
    k[:, :, cut:] = POISON[poison]
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    with ops.use_backend(backend):
        o = ops.flash_attention(qr, kr, vr, causal=True)
        o.backward(do)
    prefix = [t[:, :, :cut].contiguous() for t in (q, k, v, do)]
    scale = 1.0 / math.sqrt(16)
    ref64 = torch_attention(*(t.double() for t in prefix), True, scale)
    ref_pt = torch_attention(*prefix, True, scale)
    scales = term_scales(*prefix, True, scale)
    assert_close_2x(f"{backend} {poison} o[:cut]", o.detach()[:, :, :cut], ref64[0], ref_pt[0], scales["o"])
    if poison == "huge":
        assert_close_2x(f"{backend} {poison} dq[:cut]", qr.grad[:, :, :cut], ref64[2], ref_pt[2], scales["dq"])
