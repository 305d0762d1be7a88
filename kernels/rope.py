"""Fused rotary position embedding (RoPE) for q and k in one launch, forward and backward, as NKI kernels.

Reference: ``kernels.reference.apply_rope_ref`` (forward) and ``rope_bwd_ref`` (backward).
Op:        ``kernels.ops.apply_rope``.   Tests: ``tests/test_kernel_rope.py``.

Convention: Hugging Face Llama ``apply_rotary_pos_emb`` (rotate-half), with x = [x1 | x2] split at D/2:
    forward   out = x * cos + rotate_half(x) * sin,        rotate_half(u)   = [-u2 | u1]
              out1 = x1 * cos1 - x2 * sin1 ;  out2 = x2 * cos2 + x1 * sin2
    backward  dx = dy * cos + rotate_half^T(dy * sin),     rotate_half^T(u) = [ u2 | -u1]
              dx1 = dy1 * cos1 + dy2 * sin2 ;  dx2 = dy2 * cos2 - dy1 * sin1
(with HF's cos/sin = cat(freqs, freqs) this equals the forward with sin -> -sin, but the kernel does
not rely on that). Numerics: every product and sum in fp32 inside the engines, one rounding to the
input dtype per output element (PyTorch in bf16 rounds three times, after each product and the sum).

Layout: q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D]. For each (b, tile of 128 positions)
the cos/sin tiles are loaded once and reused for all q and k heads; the heads are stacked on the free
axis of one SBUF tile [128, G, D] (one DMA per head) so that five VectorE instructions rotate all of
them, with cos/sin broadcast over the head axis by a stride-0 view (no copy). Each input byte is read
once and each output byte written once: that is the minimum-bytes schedule.
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

MAX_HEAD_DIM = 128
# Heads per SBUF group: G * D <= 4096 elements, i.e. the fp32 temporaries stay at 16 KiB per partition.
_GROUP_ELEMS = 4096


@nki.jit
def rope_kernel(q, k, cos, sin, inverse=False):
    """Rotate q and k (forward) or their gradients (inverse=True); returns (q_out, k_out) in q.dtype.

    SBUF per partition (worst case, fp32, G * D = 4096): input 16 KiB + product 16 KiB + two
    half-width products 16 KiB + output 16 KiB + cos/sin 1 KiB -> 65 KiB. No PSUM.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    P = nl.tile_size.pmax
    half = D // 2
    dt = q.dtype
    f32 = nl.float32
    q_out = nl.ndarray(q.shape, dtype=dt, buffer=nl.shared_hbm)
    k_out = nl.ndarray(k.shape, dtype=dt, buffer=nl.shared_hbm)

    # All heads of q then k, as (source, destination, head) triples; grouped to bound SBUF.
    heads = [(q, q_out, h) for h in range(Hq)] + [(k, k_out, h) for h in range(Hkv)]
    group = max(1, _GROUP_ELEMS // D)
    groups = [heads[i:i + group] for i in range(0, len(heads), group)]
    # Forward: lo = x1*c1 - x2*s1, hi = x2*c2 + x1*s2.  Backward: lo = x1*c1 + x2*s2, hi = x2*c2 - x1*s1.
    op_lo = nl.add if inverse else nl.subtract
    op_hi = nl.subtract if inverse else nl.add
    sin_for_lo = (half, D) if inverse else (0, half)
    sin_for_hi = (0, half) if inverse else (half, D)

    for b in range(B):
        for s0 in range(0, S, P):
            rows = min(P, S - s0)
            cos_t = nl.ndarray((P, 1, D), dtype=cos.dtype, buffer=nl.sbuf)
            sin_t = nl.ndarray((P, 1, D), dtype=sin.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=cos_t[0:rows, 0, :], src=cos[b, s0:s0 + rows, :])
            nisa.dma_copy(dst=sin_t[0:rows, 0, :], src=sin[b, s0:s0 + rows, :])
            for grp in groups:
                G = len(grp)
                x_t = nl.ndarray((P, G, D), dtype=dt, buffer=nl.sbuf)
                for j in range(G):
                    src, _, h = grp[j]
                    nisa.dma_copy(dst=x_t[0:rows, j, :], src=src[b, h, s0:s0 + rows, :])
                cos_b = cos_t[0:rows].broadcast(1, G)
                sin_b = sin_t[0:rows].broadcast(1, G)
                xc = nl.ndarray((P, G, D), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=xc[0:rows], data1=x_t[0:rows], data2=cos_b, op=nl.multiply)
                t_lo = nl.ndarray((P, G, half), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=t_lo[0:rows], data1=x_t[0:rows, :, half:D],
                                   data2=sin_b[:, :, sin_for_lo[0]:sin_for_lo[1]], op=nl.multiply)
                t_hi = nl.ndarray((P, G, half), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=t_hi[0:rows], data1=x_t[0:rows, :, 0:half],
                                   data2=sin_b[:, :, sin_for_hi[0]:sin_for_hi[1]], op=nl.multiply)
                o_t = nl.ndarray((P, G, D), dtype=dt, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=o_t[0:rows, :, 0:half], data1=xc[0:rows, :, 0:half],
                                   data2=t_lo[0:rows], op=op_lo)
                nisa.tensor_tensor(dst=o_t[0:rows, :, half:D], data1=xc[0:rows, :, half:D],
                                   data2=t_hi[0:rows], op=op_hi)
                for j in range(G):
                    _, dst, h = grp[j]
                    nisa.dma_copy(dst=dst[b, h, s0:s0 + rows, :], src=o_t[0:rows, j, :])
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
