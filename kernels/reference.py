"""Pure-PyTorch references of the fused kernels; also the ``reference`` backend of ``kernels.ops`` (run under
plain autograd there, except attention, which that backend runs with torch's fused SDPA).

Every function here is dtype-preserving and states its numerics. "Compute dtype" below means
``promote(input dtype, float32)``: float32 for bf16/fp16/fp32 inputs and float64 for float64 inputs (so the
tests can gradcheck the same code in float64). Results are rounded to the output dtype once, at the end.

Kernels (NKI, ``kernels/<op>.py``) are tested against these functions; these functions are tested against
independent float64 formulas in ``tests/test_ops.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float32, or float64 when the input is float64."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------- RMSNorm

def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with Llama's casting order; returns ``(y, rstd)``.

    rstd  = rsqrt(mean(x^2, -1) + eps)            compute dtype (sum of squares accumulated in it), shape x.shape[:-1]
    x_hat = cast(x * rstd, x.dtype)               one rounding, as Hugging Face's LlamaRMSNorm
    y     = cast(x_hat * w, x.dtype)              product in compute dtype, one rounding

    Result dtype rule: y has x.dtype whatever w.dtype is. When w.dtype == x.dtype (the kernels' case) this
    equals Hugging Face's ``weight * hidden.to(input_dtype)`` bit for bit (a bf16*bf16 product is exact in
    fp32); Hugging Face would instead promote y to fp32 for an fp32 weight and bf16 input. rstd is returned
    in the compute dtype for the backward.
    """
    acc = _acc(x.dtype)
    x32 = x.to(acc)
    rstd = x32.pow(2).mean(-1).add_(eps).rsqrt_()
    x_hat = (x32 * rstd.unsqueeze(-1)).to(x.dtype)
    y = (x_hat.to(acc) * w.to(acc)).to(x.dtype)
    return y, rstd


def rms_norm_bwd_ref(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``rms_norm_ref``: ``(dx in x.dtype, dw in w.dtype)``, all arithmetic in the compute dtype.

    With x_hat = x * rstd (unrounded; the forward's rounding to x.dtype is taken with identity gradient,
    as PyTorch autograd does) and g = dy * w:
        dw = sum over all leading dims of dy * x_hat
        dx = rstd * (g - x_hat * mean(g * x_hat, -1))
    """
    acc = _acc(torch.promote_types(x.dtype, w.dtype))
    x32, dy32, w32 = x.to(acc), dy.to(acc), w.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    x_hat = x32 * r
    g = dy32 * w32
    dw = (dy32 * x_hat).reshape(-1, x.shape[-1]).sum(0)
    # dx in place on the fresh temporaries g and x_hat: fewer [.., H] allocations, same arithmetic
    dx = g.sub_(x_hat.mul_((g * x_hat).mean(-1, keepdim=True))).mul_(r)
    return dx.to(x.dtype), dw.to(w.dtype)


# --------------------------------------------------------------------------- RoPE

def rotate_half(u: torch.Tensor) -> torch.Tensor:
    """[u1 | u2] -> [-u2 | u1] on the last dim (Hugging Face Llama convention)."""
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat((-u2, u1), dim=-1)


def rotate_half_t(u: torch.Tensor) -> torch.Tensor:
    """Transpose of ``rotate_half``: [u1 | u2] -> [u2 | -u1]."""
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat((u2, -u1), dim=-1)


def _heads_view(t: torch.Tensor) -> torch.Tensor:
    """cos/sin [S, D] or [B, S, D] -> a view broadcastable against [B, H, S, D]."""
    return t.unsqueeze(-3)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, S, D] and k [B, Hkv, S, D], Hugging Face ``apply_rotary_pos_emb`` semantics.

    cos/sin are [S, D] or [B, S, D] (or [1, S, D]) and broadcast over heads (and batch).
        out = x * cos + rotate_half(x) * sin
    computed in the compute dtype and rounded once to x.dtype (PyTorch in bf16 would round after each
    product and after the sum; this is the more accurate value; the NKI kernel rounds like PyTorch when q, cos
    and sin are all bf16, and like this reference when any of them is fp32).
    """
    return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)


def rope_bwd_ref(dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``apply_rope_ref`` w.r.t. q and k: the transposed rotation, compute dtype, one rounding.

        dx = dy * cos + rotate_half^T(dy * sin)
    """
    return _rotate(dq_rot, cos, sin, True), _rotate(dk_rot, cos, sin, True)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, or with ``transpose`` x * cos + rotate_half^T(x * sin).

    Written on the halves of the last dim (no rotated copy of x, no negated half):
        forward     [x1 c1 - x2 s1 | x2 c2 + x1 s2]
        transposed  [x1 c1 + x2 s2 | x2 c2 - x1 s1]
    Compute dtype; each half is a product and one multiply-add, rounded once to x.dtype at the end.
    """
    acc = _acc(x.dtype)
    x32, c, s = x.to(acc), _heads_view(cos).to(acc), _heads_view(sin).to(acc)
    h = x.shape[-1] // 2
    x1, x2, c1, c2, s1, s2 = x32[..., :h], x32[..., h:], c[..., :h], c[..., h:], s[..., :h], s[..., h:]
    if transpose:
        s1, s2 = -s2, -s1                                  # [x1 c1 + x2 s2 | x2 c2 - x1 s1]
    out = torch.cat(((x1 * c1).addcmul_(x2, s1, value=-1), (x2 * c2).addcmul_(x1, s2)), dim=-1)
    return out.to(x.dtype)


def rope_cos_sin_grad_ref(dq_rot, dk_rot, q, k, cos, sin):
    """Gradients w.r.t. cos and sin (rarely needed: rotary tables are usually constants), shaped like cos/sin.

        dcos = sum_heads(dq_rot * q) + sum_heads(dk_rot * k)
        dsin = sum_heads(dq_rot * rotate_half(q)) + sum_heads(dk_rot * rotate_half(k))
    summed further over batch when cos/sin were broadcast over it; compute dtype, rounded to cos.dtype.
    """
    acc = _acc(torch.promote_types(q.dtype, cos.dtype))
    dq, dk, q32, k32 = dq_rot.to(acc), dk_rot.to(acc), q.to(acc), k.to(acc)
    dcos = (dq * q32).sum(1) + (dk * k32).sum(1)
    dsin = (dq * rotate_half(q32)).sum(1) + (dk * rotate_half(k32)).sum(1)

    def fit(g, like):
        while g.dim() > like.dim():
            g = g.sum(0)
        if g.shape[0] != like.shape[0]:          # [1, S, D] broadcast over batch
            g = g.sum(0, keepdim=True)
        return g.to(like.dtype)

    return fit(dcos, cos), fit(dsin, sin)


# --------------------------------------------------------------------------- SwiGLU

def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up = gate * sigmoid(gate) * up, in the compute dtype, rounded once to gate.dtype.

    ``F.silu`` is one fused pass (and one fused backward when this runs under autograd, as on the reference
    backend) instead of two products and a sigmoid.
    """
    acc = _acc(gate.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_bwd_ref(dout: torch.Tensor, gate: torch.Tensor,
                   up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``swiglu_ref``: ``(dgate, dup)`` in the input dtypes, compute dtype inside.

    With s = sigmoid(gate): dup = dout * gate * s;  dgate = dout * up * s * (1 + gate * (1 - s)).
    """
    acc = _acc(gate.dtype)
    g, u, d = gate.to(acc), up.to(acc), dout.to(acc)
    s = torch.sigmoid(g)
    dup = d * g * s
    dgate = d * u * s * (1.0 + g * (1.0 - s))
    return dgate.to(gate.dtype), dup.to(up.dtype)


# --------------------------------------------------------------------------- attention
#
# Native GQA without repeating K/V: q [B, Hq, S, D] is viewed as [B, Hkv, G*S, D] (q head h = kv head
# h // G, so the G heads of a group are adjacent); every matmul then runs against the un-repeated
# k/v [B, Hkv, S, D], and dK/dV come out already summed over the group. Rows of the G*S axis are
# processed in blocks so that the fp32 score block stays near _BLOCK_BYTES (memory O(block * S), not O(S^2)).

_BLOCK_BYTES = 64 << 20


def _softmax_scale(d: int, softmax_scale):
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def _row_blocks(b, hkv, rows, s, itemsize):
    per_row = max(1, b * hkv * s * itemsize)
    blk = max(1, min(rows, _BLOCK_BYTES // per_row))
    return [(r0, min(rows, r0 + blk)) for r0 in range(0, rows, blk)]


def _masked_scores(qb, k32, r0, r1, s, causal, scale):
    """scores [B, Hkv, r1-r0, S] = scale * qb @ k^T, with keys after the query position set to -inf."""
    sc = torch.matmul(qb, k32.transpose(-1, -2)) * scale
    if causal:
        pos = torch.arange(r0, r1, device=qb.device) % s        # query position of each row of the block
        keys = torch.arange(s, device=qb.device)
        sc = sc.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
    return sc


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with native GQA; returns ``(out [B,Hq,S,D] q.dtype, lse [B,Hq,S])``.

    q [B, Hq, S, D], k/v [B, Hkv, S, D], Hq % Hkv == 0, q head h attends with kv head h // (Hq // Hkv).
    scores = q @ k^T * scale (scale = 1/sqrt(D) by default) in the compute dtype (fp32, or fp64 for fp64
    inputs), causal mask (key j > query i masked, top-left aligned, Sq == Sk), softmax in the compute
    dtype, out = P @ v in the compute dtype rounded once to q.dtype. lse = logsumexp of the scaled scores
    per row (compute dtype), kept for the backward. Not a kernel: there is no NKI attention kernel yet.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    acc = _acc(q.dtype)
    scale = _softmax_scale(d, softmax_scale)
    qg = q.to(acc).reshape(b, hkv, (hq // hkv) * s, d)
    k32, v32 = k.to(acc), v.to(acc)
    out = torch.empty(qg.shape, dtype=acc, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=acc, device=q.device)
    for r0, r1 in _row_blocks(b, hkv, qg.shape[2], s, torch.finfo(acc).bits // 8):
        sc = _masked_scores(qg[:, :, r0:r1], k32, r0, r1, s, causal, scale)
        m = torch.logsumexp(sc, dim=-1, keepdim=True)
        out[:, :, r0:r1] = torch.matmul(torch.exp(sc - m), v32)
        lse[:, :, r0:r1] = m.squeeze(-1)
    return out.reshape(b, hq, s, d).to(q.dtype), lse.reshape(b, hq, s)


def flash_attention_bwd_ref(dout, q, k, v, out, lse, causal: bool = True, softmax_scale: float | None = None):
    """Gradients of ``flash_attention_ref``: ``(dq, dk, dv)`` in the dtypes of q, k, v; compute dtype inside.

    Recomputes P = exp(scores - lse) block by block (FlashAttention-2's backward), with
        Dlt = rowsum(dout * out),  dP = dout @ v^T,  dS = P * (dP - Dlt)
        dq = scale * dS @ k,  dk = scale * dS^T @ q,  dv = P^T @ dout
    where dk and dv are accumulated over the G query heads of each kv head (the [B, Hkv, G*S, D] view
    makes each matmul sum the group), so no repeated K/V or per-q-head dK/dV is materialised.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    acc = _acc(q.dtype)
    scale = _softmax_scale(d, softmax_scale)
    rows = (hq // hkv) * s
    qg = q.to(acc).reshape(b, hkv, rows, d)
    dog = dout.to(acc).reshape(b, hkv, rows, d)
    og = out.to(acc).reshape(b, hkv, rows, d)
    lg = lse.to(acc).reshape(b, hkv, rows, 1)
    k32, v32 = k.to(acc), v.to(acc)
    dq = torch.empty_like(qg)
    dk = torch.zeros_like(k32)
    dv = torch.zeros_like(v32)
    for r0, r1 in _row_blocks(b, hkv, rows, s, torch.finfo(acc).bits // 8):
        qb, dob = qg[:, :, r0:r1], dog[:, :, r0:r1]
        p = torch.exp(_masked_scores(qb, k32, r0, r1, s, causal, scale) - lg[:, :, r0:r1])
        dlt = (dob * og[:, :, r0:r1]).sum(-1, keepdim=True)
        ds = p * (torch.matmul(dob, v32.transpose(-1, -2)) - dlt)
        dq[:, :, r0:r1] = torch.matmul(ds, k32) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qb) * scale
        dv += torch.matmul(p.transpose(-1, -2), dob)
    return dq.reshape(b, hq, s, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
