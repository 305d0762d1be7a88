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
in HBM), in the chunks of _plan (at T >= 32: 2, 5 and 12 positions first, per-head loads, so that VectorE
starts after a 64 KiB load; then up to 12 positions of 4 heads per load DMA; a last 2-position chunk with
per-head stores so that the final store is short); the S - S0 leftover positions are one [r, 1, D] block.
Loads, outputs, tables and products live in byte rings (small chunks pack densely, so loads run ahead).
Per (b, chunk) cos/sin are loaded once and reused for all q and k heads: minimum HBM bytes.
Why not faster (cost model): the two products are 2 x S x D x (Hq + Hkv) / 128 VectorE cycles per batch
row at 1.12 GHz (bf16 fast path, N cycles each): 58.5 us at Llama 2 7B per rank against an HBM floor of
46.0 us. GpSimd shares VectorE's SBUF port; ScalarE and TensorE multiply only by per-partition scalars.
The first product waits for a load and the last store follows the last product, each >= 1.3 us issue
latency + 0.21 us packet setup, so even a perfect pipeline takes >= 61.5 us = 74.8% of the roofline
(< 75%). The 3-product (Gauss) rotation needs equal table halves and failed the 2x criterion in bf16.
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

MAX_HEAD_DIM = 128
_X_BYTES = 48 * 1024   # per-partition ring of loaded head groups (byte ring: small chunks pack densely)
_O_BYTES = 48 * 1024   # per-partition ring of rotated head groups awaiting their store
_T_BYTES = 24 * 1024   # per-partition ring of cos / sin / s' chunks
_PR_BYTES = 24 * 1024  # per-partition ring of the two products of one head
_PSUM_F = 512          # fp32 elements of one PSUM bank per partition
_NBANK = 4             # PSUM banks cycled by the identity-matmul sums


def _plan(T, nheads):
    """[(j0, n, heads per load, heads per store)] covering positions 0..T-1 per partition."""
    # a chunk: (positions per partition, heads per load DMA, heads per store DMA)
    if T < 32:
        plan = [(T, 1, 1)]
    else:
        # tuned at 7B (T = 32) in the cost model: small first chunks start VectorE early, a small last chunk
        # keeps the final store short, the middle reloads at most 12 positions of 4 heads per DMA
        rest = T - 21
        k = -(-rest // 12)
        plan = [(2, 1, 1), (5, 1, 1), (12, 2, 2)] + [(rest // k + (i < rest % k), 4, 1) for i in range(k)] \
            + [(2, 4, 1)]
    out, j = [], 0
    for n, gl, gs in plan:
        out.append((j, n, max(1, min(gl, nheads)), max(1, min(gs, nheads))))
        j += n
    assert j == T, (plan, T)
    return out


def _take(ring, size):
    """Next free [start, start + size) of a byte ring [offset, capacity]: wraps to 0 when the rest is short."""
    a = ring[0] if ring[0] + size <= ring[1] else 0
    ring[0] = a + size
    return a


def _region(buf, ring, rows, shape):
    """A [rows, *shape] view of the next free part of the ring buffer buf [P, capacity]."""
    n = 1
    for s in shape:
        n *= s
    a = _take(ring, n)
    return buf[0:rows, a:a + n].reshape((rows,) + tuple(shape))


def _groups(heads, g):
    """Runs of up to g consecutive heads of one tensor: [(src, dst, first head, count)]."""
    out = []
    for src, dst, h in heads:
        if out and out[-1][0] is src and out[-1][3] < g:
            s, d, h0, c = out[-1]
            out[-1] = (s, d, h0, c + 1)
        else:
            out.append((src, dst, h, 1))
    return out


def _view(t, s0, rows, T, j0, nt, h0, nh):
    """[rows, nh, nt, D] view of positions s0 + p * T + j0 .. + nt - 1 of heads h0.. of a [H, S, D] tensor."""
    v = t[h0:h0 + nh, s0:s0 + rows * T, :].reshape((nh, rows, T, t.shape[-1])).permute((1, 0, 2, 3))
    return v[:, :, j0:j0 + nt, :]


def _tview(t, s0, rows, T, j0, nt):
    """[rows, nt, D] view of the same positions of a [S, D] table."""
    return t[s0:s0 + rows * T, :].reshape((rows, T, t.shape[-1]))[:, j0:j0 + nt, :]


def _identity(P, dt):
    ones = nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ident = nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf)
    # a = p - j == 0 on the diagonal (GpSimd affine_select, nki-spec 2.6)
    nisa.affine_select(dst=ident, pattern=[[-1, P]], channel_multiplier=1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.equal)
    return ident


def _blocks(S, P, nheads):
    """(position offset, rows, positions per partition T, chunk start, chunk length, heads per DMA)."""
    T = S // P
    out = [(0, P, T, j0, n, gl, gs) for j0, n, gl, gs in _plan(T, nheads)] if T else []
    if S - T * P:
        out.append((T * P, S - T * P, 1, 0, 1, 1, 1))
    return out


def _rotate(ident, x_t, cos_t, sp_t, p_t, r_t, o_t, banks, bank, rows, nt, D):
    """o_t = cast(cast(x * cos) + swap_halves(cast(x * s'))): two VectorE products, TensorE sums, ScalarE
    eviction. Returns the next PSUM bank counter."""
    half = D // 2
    pb = max(1, _PSUM_F // D)                 # positions per PSUM bank
    nisa.tensor_tensor(dst=p_t, data1=x_t, data2=cos_t, op=nl.multiply)
    nisa.tensor_tensor(dst=r_t, data1=x_t, data2=sp_t, op=nl.multiply)
    idn = ident[0:rows, 0:rows]
    for j in range(0, nt, pb):
        n = min(pb, nt - j)
        ps = banks[bank % _NBANK][:, 0:pb * D].reshape((ident.shape[0], pb, D))[0:rows, 0:n, :]
        bank += 1
        nisa.nc_matmul(dst=ps, stationary=idn, moving=p_t[:, j:j + n, :], accumulate=False)
        nisa.nc_matmul(dst=ps[:, :, 0:half], stationary=idn, moving=r_t[:, j:j + n, half:D], accumulate=True)
        nisa.nc_matmul(dst=ps[:, :, half:D], stationary=idn, moving=r_t[:, j:j + n, 0:half], accumulate=True)
        nisa.activation(dst=o_t[:, j:j + n, :], op=nl.copy, data=ps)
    return bank


@nki.jit
def rope_kernel(q, k, cos, sin, inverse=False):
    """Rotate q and k (forward) or their gradients (inverse=True); returns (q_out, k_out) in q.dtype.

    SBUF per partition (7B plan: chunks <= 12 positions, 4 heads per DMA, bf16): x and out rings
    2 x 3 x 4 x 12 x 256 B = 72 KiB, cos/sin/s' 3 x 2 x 3 KiB, p/r 2 x 3 x 3 KiB, identity -> ~109 KiB.
    PSUM: _NBANK banks.
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
    blocks = _blocks(S, P, max(Hq, Hkv))
    it = dt.itemsize
    x_buf = nl.ndarray((P, _X_BYTES // it), dtype=dt, buffer=nl.sbuf)
    o_buf = nl.ndarray((P, _O_BYTES // it), dtype=dt, buffer=nl.sbuf)
    t_buf = nl.ndarray((P, _T_BYTES // 3 // it), dtype=dt, buffer=nl.sbuf)
    c_buf = nl.ndarray((P, _T_BYTES // 3 // cos.dtype.itemsize), dtype=cos.dtype, buffer=nl.sbuf)
    s_buf = nl.ndarray((P, _T_BYTES // 3 // sin.dtype.itemsize), dtype=sin.dtype, buffer=nl.sbuf)
    pr_buf = nl.ndarray((P, _PR_BYTES // it), dtype=dt, buffer=nl.sbuf)
    xr, orr, prr = [0, _X_BYTES // it], [0, _O_BYTES // it], [0, _PR_BYTES // it]
    trr = [0, _T_BYTES // 3 // it]
    crr = [0, _T_BYTES // 3 // cos.dtype.itemsize]
    srr = [0, _T_BYTES // 3 // sin.dtype.itemsize]
    banks = [nl.ndarray((P, _PSUM_F), dtype=f32, buffer=nl.psum) for _ in range(_NBANK)]
    # s' = [sin2 | -sin1] (forward) or [-sin1 | sin2] (backward): (source half, sign) per destination half.
    s_lo, s_hi = ((0, -1.0), (half, 1.0)) if inverse else ((half, 1.0), (0, -1.0))
    bank = 0
    for b in range(B):
        for s0, rows, T, j0, nt, gl, gs in blocks:
            cos_t = _region(c_buf, crr, rows, (nt, D))
            sin_t = _region(s_buf, srr, rows, (nt, D))
            sp = _region(t_buf, trr, rows, (nt, D))
            nisa.dma_copy(dst=cos_t, src=_tview(cos[b], s0, rows, T, j0, nt))
            nisa.dma_copy(dst=sin_t, src=_tview(sin[b], s0, rows, T, j0, nt))
            for (src0, sign), d0 in ((s_lo, 0), (s_hi, half)):
                nisa.activation(dst=sp[:, :, d0:d0 + half], op=nl.copy, data=sin_t[:, :, src0:src0 + half],
                                scale=sign)
            for src, dst, h0, nh in _groups(heads, gl):
                x_g = _region(x_buf, xr, rows, (nh, nt, D))
                nisa.dma_copy(dst=x_g, src=_view(src[b], s0, rows, T, j0, nt, h0, nh))
                for i0 in range(0, nh, gs):
                    ns = min(gs, nh - i0)
                    o_g = _region(o_buf, orr, rows, (ns, nt, D))
                    for i in range(ns):
                        p_t = _region(pr_buf, prr, rows, (nt, D))
                        r_t = _region(pr_buf, prr, rows, (nt, D))
                        bank = _rotate(ident, x_g[:, i0 + i], cos_t, sp, p_t, r_t, o_g[:, i], banks, bank, rows,
                                       nt, D)
                    nisa.dma_copy(dst=_view(dst[b], s0, rows, T, j0, nt, h0 + i0, ns), src=o_g)
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
