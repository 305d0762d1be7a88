"""Property tests of the RoPE NKI kernel (kernels/rope.py) run by the interpreter (backend "sim").

Independent reference: Hugging Face transformers' Llama ``apply_rotary_pos_emb`` (rotate-half), run in
float64 (truth) and in the kernel's dtype (PyTorch's own error); gradients by torch.autograd through it.
Criterion in tests/kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kernels import ops, reference, rope
from kernels.sim import trace
from kernel_helpers import DTYPES, assert_close_2x, hf_cos_sin, randn

head_dims = st.one_of(st.sampled_from([64, 128]), st.integers(1, 63).map(lambda i: 2 * i))


def ref_fwd_bwd(q, k, cos, sin, dq_out, dk_out):
    """HF rotation of q, k and the autograd gradients for upstream grads dq_out, dk_out (all one dtype)."""
    qr = q.detach().clone().requires_grad_(True)
    kr = k.detach().clone().requires_grad_(True)
    q_out, k_out = apply_rotary_pos_emb(qr, kr, cos, sin)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    return q_out.detach(), k_out.detach(), qr.grad, kr.grad


def make_inputs(b, hq, hkv, s, d, dtype, seed, hf_tables):
    q = randn((b, hq, s, d), dtype, seed)
    k = randn((b, hkv, s, d), dtype, seed + 1)
    if hf_tables:
        cos, sin = hf_cos_sin(b, s, d, dtype, offset=seed % 1000)
    else:
        # Arbitrary tables (sin halves differ) so that the backward's transposed rotation is really tested.
        cos, sin = randn((b, s, d), dtype, seed + 2), randn((b, s, d), dtype, seed + 3)
    dq = randn((b, hq, s, d), dtype, seed + 4)
    dk = randn((b, hkv, s, d), dtype, seed + 5)
    return q, k, cos, sin, dq, dk


def check_all(q, k, cos, sin, dq_up, dk_up, outs, prefix=""):
    d64 = [t.double() for t in (q, k, cos, sin, dq_up, dk_up)]
    ref64 = ref_fwd_bwd(*d64)
    ref_pt = ref_fwd_bwd(q, k, cos, sin, dq_up, dk_up)
    # Each output element is x_i * cos +- x_j * sin: the two products may cancel, so the fp32 floor of
    # kernel_helpers is taken at their magnitude.
    table = (cos.double().abs() + sin.double().abs()).max().item()
    scales = [t.double().abs().max().item() * table for t in (q, k, dq_up, dk_up)]
    for name, out, r64, rpt, sc in zip(("q_rot", "k_rot", "dq", "dk"), outs, ref64, ref_pt, scales):
        assert_close_2x(prefix + name, out, r64, rpt, sc)


@settings(max_examples=14)
@given(b=st.integers(1, 2), hq=st.integers(1, 4), hkv=st.integers(1, 4), s=st.integers(1, 300), d=head_dims,
       dtype=st.sampled_from(DTYPES), hf_tables=st.booleans(), seed=st.integers(0, 2**16))
def test_launchers_match_float64(b, hq, hkv, s, d, dtype, hf_tables, seed):
    q, k, cos, sin, dq_up, dk_up = make_inputs(b, hq, hkv, s, d, dtype, seed, hf_tables)
    q_rot, k_rot = rope.rope_fwd(q, k, cos, sin)
    dq, dk = rope.rope_bwd(dq_up, dk_up, cos, sin)
    check_all(q, k, cos, sin, dq_up, dk_up, (q_rot, k_rot, dq, dk))


@settings(max_examples=5)
@given(hq=st.sampled_from([2, 4]), s=st.integers(1, 200), d=st.sampled_from([64, 128, 6]),
       dtype=st.sampled_from(DTYPES), table_2d=st.booleans(), seed=st.integers(0, 2**16))
def test_op_autograd_sim_backend(hq, s, d, dtype, table_2d, seed):
    """kernels.ops.apply_rope with backend "sim" (GQA: k has half the heads); cos/sin [B,S,D] or [S,D]."""
    q, k, cos, sin, dq_up, dk_up = make_inputs(1, hq, hq // 2, s, d, dtype, seed, True)
    qk = q.clone().requires_grad_(True)
    kk = k.clone().requires_grad_(True)
    with ops.use_backend("sim"):
        q_rot, k_rot = ops.apply_rope(qk, kk, cos[0] if table_2d else cos, sin[0] if table_2d else sin)
        torch.autograd.backward((q_rot, k_rot), (dq_up, dk_up))
    check_all(q, k, cos, sin, dq_up, dk_up, (q_rot.detach(), k_rot.detach(), qk.grad, kk.grad), "op ")


def test_hbm_bytes_are_minimal():
    """cos/sin are read once per (batch, position tile), not once per head: bytes = inputs + outputs."""
    b, hq, hkv, s, d = 2, 4, 2, 300, 64
    q, k, cos, sin, dq_up, dk_up = make_inputs(b, hq, hkv, s, d, torch.bfloat16, 0, True)
    qk_bytes = 2 * (b * hq * s * d + b * hkv * s * d)
    table_bytes = 2 * 2 * b * s * d
    for fn, args in ((rope.rope_fwd, (q, k, cos, sin)), (rope.rope_bwd, (dq_up, dk_up, cos, sin))):
        with trace.record() as tr:
            fn(*args)
        assert tr.hbm_bytes() == (qk_bytes + table_bytes, qk_bytes)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (5, 5), (8, 1)], ids=["7b", "13b", "70b"])
def test_llama_per_rank_shapes_pass_trn1_checks(hq, hkv):
    """Per TP rank at TP=8, seq 4096, micro-batch 1: 7B (4 q + 4 kv heads), 13B (5 + 5) and 70B (8 q heads,
    1 kv head). The interpreter checks trn1 rules and capacity on every
    instruction; results are compared with float64 on the full tensors."""
    q, k, cos, sin, dq_up, dk_up = make_inputs(1, hq, hkv, 4096, 128, torch.bfloat16, 3, True)
    q_rot, k_rot = rope.rope_fwd(q, k, cos, sin)
    dq, dk = rope.rope_bwd(dq_up, dk_up, cos, sin)
    check_all(q, k, cos, sin, dq_up, dk_up, (q_rot, k_rot, dq, dk), f"{hq}/{hkv} heads ")


def test_scalar_slots_with_batches_leftover_and_arbitrary_tables():
    """The ScalarE slot path (S // 128 >= 32 positions per partition) across two batch rows, with a leftover
    partial block (S % 128 = 37) and arbitrary tables (sin halves differ, so the backward's transposed
    rotation is tested on the slot path too)."""
    q, k, cos, sin, dq_up, dk_up = make_inputs(2, 4, 4, 4096 + 37, 128, torch.bfloat16, 7, False)
    q_rot, k_rot = rope.rope_fwd(q, k, cos, sin)
    dq, dk = rope.rope_bwd(dq_up, dk_up, cos, sin)
    check_all(q, k, cos, sin, dq_up, dk_up, (q_rot, k_rot, dq, dk), "slots ")


_BF, _F32 = torch.bfloat16, torch.float32
# (x, cos, sin) dtypes: every accepted combination that is not one dtype throughout
_MIXED = [(_BF, _F32, _F32), (_F32, _BF, _BF), (_BF, _F32, _BF), (_BF, _BF, _F32), (_F32, _F32, _BF),
          (_F32, _BF, _F32)]


def check_mixed(q, k, cos, sin, dq_up, dk_up, outs, prefix):
    """check_all for tables whose dtype differs from q's. Truth: kernels.reference (apply_rope_ref,
    rope_bwd_ref) in float64; the low-precision comparator is the same reference on the given dtypes, i.e. the
    numerics kernels.ops.apply_rope documents (fp32 compute, one rounding to q's dtype): stricter than HF in
    bf16, which rounds each product (and HF on mixed dtypes promotes the output to fp32)."""
    d64 = [t.double() for t in (q, k, cos, sin, dq_up, dk_up)]
    ref64 = reference.apply_rope_ref(*d64[:4]) + reference.rope_bwd_ref(*d64[4:], *d64[2:4])
    ref_lp = reference.apply_rope_ref(q, k, cos, sin) + reference.rope_bwd_ref(dq_up, dk_up, cos, sin)
    table = (cos.double().abs() + sin.double().abs()).max().item()
    scales = [t.double().abs().max().item() * table for t in (q, k, dq_up, dk_up)]
    for name, out, r64, rlp, sc in zip(("q_rot", "k_rot", "dq", "dk"), outs, ref64, ref_lp, scales):
        assert_close_2x(prefix + name, out, r64, rlp, sc)


def mixed_inputs(b, hq, hkv, s, d, dtypes, seed, hf_tables):
    xd, cd, sd = dtypes
    q, k, cos, sin, dq_up, dk_up = make_inputs(b, hq, hkv, s, d, torch.float64, seed, hf_tables)
    return q.to(xd), k.to(xd), cos.to(cd), sin.to(sd), dq_up.to(xd), dk_up.to(xd)


@pytest.mark.parametrize("dtypes", _MIXED, ids=lambda t: "/".join(str(x)[6:] for x in t))
@pytest.mark.parametrize("b,hq,hkv,s,d,hf_tables", [(1, 2, 1, 4096, 64, True), (2, 2, 2, 4096 + 37, 128, False)],
                         ids=["slots-d64", "no-slots-d128-leftover"])
def test_mixed_table_dtypes_at_long_sequences(dtypes, b, hq, hkv, s, d, hf_tables):
    """cos/sin in another dtype than q/k (each of q, cos, sin bf16 or fp32) at S = 4096, where the ScalarE
    slot path runs at D <= 64 (row bytes <= 256 even with fp32): its TensorE transposes of the tables paired
    an fp32 table with q's bf16 identity (or a bf16 table with fp32's), which the interpreter rejects
    (matmul.fp32_pair). D = 128 takes the VectorE-only path (slots off: fp32 rows are 512 bytes), with two
    batch rows, a leftover block and arbitrary tables."""
    q, k, cos, sin, dq_up, dk_up = mixed_inputs(b, hq, hkv, s, d, dtypes, 11, hf_tables)
    q_rot, k_rot = rope.rope_fwd(q, k, cos, sin)
    dq, dk = rope.rope_bwd(dq_up, dk_up, cos, sin)
    check_mixed(q, k, cos, sin, dq_up, dk_up, (q_rot, k_rot, dq, dk), "mixed ")


@pytest.mark.parametrize("dtypes", _MIXED[:2], ids=["bf16-x-fp32-tables", "fp32-x-bf16-tables"])
def test_op_mixed_table_dtypes_sim_backend(dtypes):
    """The same through kernels.ops.apply_rope (backend "sim", autograd; [S, D] tables) on the slot path."""
    q, k, cos, sin, dq_up, dk_up = mixed_inputs(1, 2, 1, 4096, 64, dtypes, 5, True)
    qk = q.clone().requires_grad_(True)
    kk = k.clone().requires_grad_(True)
    with ops.use_backend("sim"):
        q_rot, k_rot = ops.apply_rope(qk, kk, cos[0], sin[0])
        torch.autograd.backward((q_rot, k_rot), (dq_up, dk_up))
    check_mixed(q, k, cos, sin, dq_up, dk_up, (q_rot.detach(), k_rot.detach(), qk.grad, kk.grad), "op mixed ")


@pytest.mark.parametrize("bad", ["dtype", "head_dim_odd", "head_dim_big", "k_shape", "k_dtype", "table_shape"])
def test_unsupported_inputs_raise_before_launch(bad):
    q, k, cos, sin, _, _ = make_inputs(1, 2, 1, 8, 16, torch.float32, 0, True)
    with pytest.raises(ValueError) as exc:
        if bad == "dtype":
            rope.rope_fwd(q.half(), k.half(), cos, sin)
        elif bad == "head_dim_odd":
            rope.rope_fwd(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
        elif bad == "head_dim_big":
            q2, k2, c2, s2, _, _ = make_inputs(1, 1, 1, 4, 130, torch.float32, 0, True)
            rope.rope_fwd(q2, k2, c2, s2)
        elif bad == "k_shape":
            rope.rope_fwd(q, k[:, :, :4], cos, sin)
        elif bad == "k_dtype":
            rope.rope_bwd(q, k.bfloat16(), cos, sin)
        elif bad == "table_shape":
            rope.rope_fwd(q, k, cos[:, :4], sin[:, :4])
    msg = str(exc.value)
    assert "kernels/rope.py" in msg
    if bad == "head_dim_big":
        assert "130" in msg and "128" in msg
