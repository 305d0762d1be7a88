"""Fused rotary position embedding (RoPE) for q and k in one launch, forward and backward, as NKI kernels.

Reference: ``kernels.reference.apply_rope_ref`` (forward) and ``rope_bwd_ref`` (backward).
Op:        ``kernels.ops.apply_rope``.   Tests: ``tests/test_kernel_rope.py``.

Convention: Hugging Face Llama ``apply_rotary_pos_emb`` (rotate-half), with x = [x1 | x2] split at D/2:
    forward   out = x * cos + rotate_half(x) * sin,        rotate_half(u)   = [-u2 | u1]
              out1 = x1 * cos1 - x2 * sin1 ;  out2 = x2 * cos2 + x1 * sin2
    backward  dx = dy * cos + rotate_half^T(dy * sin),     rotate_half^T(u) = [ u2 | -u1]
              dx1 = dy1 * cos1 + dy2 * sin2 ;  dx2 = dy2 * cos2 - dy1 * sin1
(with HF's cos/sin = cat(freqs, freqs) this equals the forward with sin -> -sin, but the kernel does
not rely on that).

Computation: with a signed sine table s' (forward [sin2 | -sin1], backward [-sin1 | sin2]),
    p = cast(x * cos),  r = cast(x * s')                    VectorE, two products per element
    out = cast(p + swap_halves(r))                          TensorE identity matmuls accumulating p and
                                                            the two halves of r (moving views) in fp32
                                                            PSUM; ScalarE evicts PSUM to the output tile
Numerics (casting order): the two products are rounded to the input dtype, then summed in fp32 and rounded
once more: exactly where PyTorch in bf16 rounds (x * cos, rotate_half(x) * sin, their sum); the negation
and the half swap are exact. For fp32 inputs every value is fp32 (fp32 matmuls).

Layout: q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D]. The first S0 = 128 * (S // 128) positions
of a head are read as [128, S // 128, D] (partition p holds positions p * T .. p * T + T - 1, contiguous
in HBM), in chunks of up to CHUNK_BYTES per partition; the S - S0 leftover positions are one [r, 1, D]
block. Per (b, chunk) cos/sin are loaded once and reused for all q and k heads. Each input byte is read
once and each output byte written once: the minimum-bytes schedule. Why not faster: the two products are
2 x S x D x (Hq + Hkv) / 128 VectorE cycles per batch row at 1.12 GHz (bf16 fast path, N cycles each);
at Llama 2 7B per rank that is 58.5 us against an HBM floor of 46 us, so the kernel is VectorE-bound at
<= 79% of the HBM roofline in the cost model (GpSimd shares VectorE's SBUF port and is slower for
two-input ops; ScalarE and TensorE cannot multiply two tensors elementwise).
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

MAX_HEAD_DIM = 128
CHUNK_BYTES = 8192     # bytes per partition of one head's chunk (>= 4 KiB: DMA efficiency guideline)
_NBUF = 3              # load ring depth
_PSUM_F = 512          # fp32 elements of one PSUM bank per partition
_NBANK = 4             # PSUM banks cycled by the identity-matmul sums


def _blocks(S, D, itemsize, P):
    """(position offset, rows, positions per partition T, chunk start, chunk length) of every block."""
    T = S // P
    tc = max(1, min(T, CHUNK_BYTES // (D * itemsize)))
    out = [(0, P, T, j0, min(tc, T - j0)) for j0 in range(0, T, tc)]
    if S - T * P:
        out.append((T * P, S - T * P, 1, 0, 1))
    return out


def _view(t, s0, rows, T, j0, nt):
    """[rows, nt, D] view of positions s0 + p * T + j0 .. + nt - 1 of a [S, D] HBM tensor t."""
    return t[s0:s0 + rows * T, :].reshape((rows, T, t.shape[-1]))[:, j0:j0 + nt, :]


def _identity(P, dt):
    ones = nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ident = nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf)
    # a = p - j == 0 on the diagonal (GpSimd affine_select, nki-spec 2.6)
    nisa.affine_select(dst=ident, pattern=[[-1, P]], channel_multiplier=1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.equal)
    return ident


@nki.jit
def rope_kernel(q, k, cos, sin, inverse=False):
    """Rotate q and k (forward) or their gradients (inverse=True); returns (q_out, k_out) in q.dtype.

    SBUF per partition (chunks of 8 KiB): x ring 3 x 8 KiB + cos, sin, s' 3 x 8 KiB (two instances each
    while a loop rebinds them) + p, r, out 3 x 8 KiB (two instances each) + identity 256 B (bf16) or
    512 B -> <= 121 KiB. PSUM: _NBANK banks.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    P = nl.tile_size.pmax
    half = D // 2
    dt = q.dtype
    f32 = nl.float32
    q_out = nl.ndarray(q.shape, dtype=dt, buffer=nl.shared_hbm)
    k_out = nl.ndarray(k.shape, dtype=dt, buffer=nl.shared_hbm)
    heads = [(q, q_out, h) for h in range(Hq)] + [(k, k_out, h) for h in range(Hkv)]
    ident = _identity(P, dt)
    blocks = _blocks(S, D, dt.itemsize, P)
    tcmax = max(nt for *_, nt in blocks)
    pb = max(1, _PSUM_F // D)                 # positions per PSUM bank
    x_r = nl.ndarray((P, _NBUF, tcmax, D), dtype=dt, buffer=nl.sbuf)
    banks = [nl.ndarray((P, _PSUM_F), dtype=f32, buffer=nl.psum) for _ in range(_NBANK)]
    # s' = [sin2 | -sin1] (forward) or [-sin1 | sin2] (backward): (source half, sign) per destination half.
    s_lo, s_hi = ((0, -1.0), (half, 1.0)) if inverse else ((half, 1.0), (0, -1.0))
    it = 0
    bank = 0
    for b in range(B):
        for s0, rows, T, j0, nt in blocks:
            cos_t = nl.ndarray((P, tcmax, D), dtype=cos.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=cos_t[0:rows, 0:nt, :], src=_view(cos[b], s0, rows, T, j0, nt))
            sin_t = nl.ndarray((P, tcmax, D), dtype=sin.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=sin_t[0:rows, 0:nt, :], src=_view(sin[b], s0, rows, T, j0, nt))
            sp = nl.ndarray((P, tcmax, D), dtype=dt, buffer=nl.sbuf)
            for (src0, sign), d0 in ((s_lo, 0), (s_hi, half)):
                nisa.activation(dst=sp[0:rows, 0:nt, d0:d0 + half], op=nl.copy,
                                data=sin_t[0:rows, 0:nt, src0:src0 + half], scale=sign)
            for src, dst, h in heads:
                x_t = x_r[0:rows, it % _NBUF, 0:nt, :]
                it += 1
                nisa.dma_copy(dst=x_t, src=_view(src[b, h], s0, rows, T, j0, nt))
                p_t = nl.ndarray((P, tcmax, D), dtype=dt, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=p_t[0:rows, 0:nt, :], data1=x_t, data2=cos_t[0:rows, 0:nt, :],
                                   op=nl.multiply)
                r_t = nl.ndarray((P, tcmax, D), dtype=dt, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=r_t[0:rows, 0:nt, :], data1=x_t, data2=sp[0:rows, 0:nt, :],
                                   op=nl.multiply)
                o_t = nl.ndarray((P, tcmax, D), dtype=dt, buffer=nl.sbuf)
                for j in range(0, nt, pb):
                    n = min(pb, nt - j)
                    ps = banks[bank % _NBANK][:, 0:pb * D].reshape((P, pb, D))[0:rows, 0:n, :]
                    bank += 1
                    idn = ident[0:rows, 0:rows]
                    nisa.nc_matmul(dst=ps, stationary=idn, moving=p_t[0:rows, j:j + n, :], accumulate=False)
                    nisa.nc_matmul(dst=ps[:, :, 0:half], stationary=idn, moving=r_t[0:rows, j:j + n, half:D],
                                   accumulate=True)
                    nisa.nc_matmul(dst=ps[:, :, half:D], stationary=idn, moving=r_t[0:rows, j:j + n, 0:half],
                                   accumulate=True)
                    nisa.activation(dst=o_t[0:rows, j:j + n, :], op=nl.copy, data=ps)
                nisa.dma_copy(dst=_view(dst[b, h], s0, rows, T, j0, nt), src=o_t[0:rows, 0:nt, :])
    return q_out, k_out


# --------------------------------------------------------------------------- torch-level launchers

_DTYPES = ("torch.bfloat16", "torch.float32")


def _check(q, k, cos, sin, qname, kname):
    for name, t in ((qname, q), (kname, k), ("cos", cos), ("sin", sin)):
        if str(t.dtype) not in _DTYPES:
            raise ValueError(f"kernels/rope.py: {name} has dtype {t.dtype}; supported dtypes are "
                             f"bfloat16 and float32")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"kernels/rope.py: {qname} and {kname} must be 4-D [B, heads, S, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"kernels/rope.py: {kname} shape {tuple(k.shape)} does not match {qname} shape "
                         f"{tuple(q.shape)} in batch, sequence or head_dim")
    if k.dtype != q.dtype:
        raise ValueError(f"kernels/rope.py: {kname} dtype {k.dtype} differs from {qname} dtype {q.dtype}")
    if min(B, Hq, k.shape[1], S, D) < 1:
        raise ValueError(f"kernels/rope.py: empty input {qname} {tuple(q.shape)}, {kname} {tuple(k.shape)}")
    if D % 2 or D > MAX_HEAD_DIM:
        raise ValueError(f"kernels/rope.py: head_dim {D} of {qname} {tuple(q.shape)} must be even and "
                         f"<= {MAX_HEAD_DIM} (one head per partition row)")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (B, S, D):
            raise ValueError(f"kernels/rope.py: {name} has shape {tuple(t.shape)}, expected [B, S, D] = "
                             f"{(B, S, D)}")


def rope_fwd(q, k, cos, sin):
    """q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D] -> (q_rot, k_rot) in q.dtype."""
    _check(q, k, cos, sin, "q", "k")
    return rope_kernel(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous(), inverse=False)


def rope_bwd(dq_rot, dk_rot, cos, sin):
    """Gradients of rope_fwd: (dq_rot, dk_rot) -> (dq, dk) by the transposed rotation."""
    _check(dq_rot, dk_rot, cos, sin, "dq_rot", "dk_rot")
    return rope_kernel(dq_rot.contiguous(), dk_rot.contiguous(), cos.contiguous(), sin.contiguous(),
                       inverse=True)
