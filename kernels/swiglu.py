"""Fused SwiGLU activation, forward and backward, as NKI kernels (trn1, NeuronCore-v2).

Reference: ``kernels.reference.swiglu_ref`` (forward) and ``swiglu_bwd_ref`` (backward).
Op:        ``kernels.ops.swiglu``.   Tests: ``tests/test_kernel_swiglu.py``.

Math and numerics (engines compute in fp32; ``t`` is the input dtype):
    forward   s      = cast_t(silu(gate))                   ScalarE
              out    = cast_t(s * up)                       VectorE
    backward  s      = cast_t(silu(gate)),  d_up = cast_t(dout * s)
              p      = cast_t(dout * up)
              d_gate = cast_t(p * silu'(gate)),  silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
                                                  (ScalarE activation nl.silu_dx, kept in fp32)
Casting order: silu(gate) and dout * up are rounded to the input dtype before the next product, exactly
where PyTorch's bf16 autograd rounds them (F.silu returns bf16; the product's grad dout * up is bf16);
silu'(gate) stays fp32 as inside PyTorch's silu_backward. For fp32 inputs every value is fp32. Rounding
to bf16 is also what makes the VectorE products bf16-only (N cycles instead of 2N, nki-spec 3.2).

Layout: the op is elementwise, so each [N, F] tensor is read as one flat array split over the 128
partitions: partition p owns the contiguous elements [p * M, (p + 1) * M), M = N * F // 128, processed in
chunks of CHUNK_BYTES per partition (one DMA of 128 x 8 KiB = 1 MiB per tensor and chunk, above the
4 KiB-per-partition DMA efficiency threshold whatever F is); the N * F % 128 leftover elements are one
[r, 1] tile. Loads go to a ring of _NBUF buffers so that chunk i + 1 loads while chunk i computes and
chunk i - 1 stores. Each input byte is read once and each output byte written once (minimum HBM bytes).
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

CHUNK_BYTES = 8192     # bytes per partition per tensor and chunk (>= 4 KiB: DMA efficiency guideline)
_NBUF = 3              # load ring depth (triple buffering: load / compute / store overlap)


def _flat_segments(tensors, P):
    """Split same-shape HBM tensors into 2-D views over partitions: [(rows, width, [view per tensor])]: the
    first P * M elements as [P, M] (each partition contiguous), the rest as [r, 1]."""
    total = 1
    for s in tensors[0].shape:
        total *= s
    flats = [t.reshape((total,)) for t in tensors]
    m = total // P
    segs = []
    if m:
        segs.append((P, m, [f[0:P * m].reshape((P, m)) for f in flats]))
    r = total - P * m
    if r:
        segs.append((r, 1, [f[P * m:total].reshape((r, 1)) for f in flats]))
    return segs


def _chunks(segs, chunk):
    """(segment index, rows, column start, column width) of every chunk of every segment, in order."""
    for si, (rows, width, _) in enumerate(segs):
        for c0 in range(0, width, chunk):
            yield si, rows, c0, min(chunk, width - c0)


@nki.jit
def swiglu_fwd_kernel(gate, up):
    """gate, up [N, F] (bf16|fp32) -> out [N, F] same dtype.

    SBUF per partition: two 3-deep input rings 6 x 8 KiB + silu and output tiles (two instances each
    while a loop rebinds them) 4 x 8 KiB = 80 KiB. No PSUM.
    """
    P = nl.tile_size.pmax
    dt = gate.dtype
    out = nl.ndarray(gate.shape, dtype=dt, buffer=nl.shared_hbm)
    C = CHUNK_BYTES // dt.itemsize
    segs = _flat_segments([gate, up, out], P)
    g_r = nl.ndarray((P, _NBUF, C), dtype=dt, buffer=nl.sbuf)
    u_r = nl.ndarray((P, _NBUF, C), dtype=dt, buffer=nl.sbuf)
    for i, (si, rows, c0, cw) in enumerate(_chunks(segs, C)):
        g_v, u_v, o_v = segs[si][2]
        b = i % _NBUF
        g_t = g_r[0:rows, b, 0:cw]
        u_t = u_r[0:rows, b, 0:cw]
        nisa.dma_copy(dst=g_t, src=g_v[:, c0:c0 + cw])
        nisa.dma_copy(dst=u_t, src=u_v[:, c0:c0 + cw])
        s_t = nl.ndarray((P, C), dtype=dt, buffer=nl.sbuf)
        nisa.activation(dst=s_t[0:rows, 0:cw], op=nl.silu, data=g_t)
        o_t = nl.ndarray((P, C), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o_t[0:rows, 0:cw], data1=s_t[0:rows, 0:cw], data2=u_t, op=nl.multiply)
        nisa.dma_copy(dst=o_v[:, c0:c0 + cw], src=o_t[0:rows, 0:cw])
    return out


@nki.jit
def swiglu_bwd_kernel(dout, gate, up):
    """dout, gate, up [N, F] -> (d_gate, d_up) [N, F] in gate.dtype.

    SBUF per partition: three 3-deep input rings 9 x 8 KiB + silu, product, outputs (two instances each)
    8 x 8 KiB + fp32 silu' 2 x 16 KiB (bf16; at fp32 the chunk has half the elements) <= 168 KiB. No PSUM.
    """
    P = nl.tile_size.pmax
    dt = gate.dtype
    f32 = nl.float32
    d_gate = nl.ndarray(gate.shape, dtype=dt, buffer=nl.shared_hbm)
    d_up = nl.ndarray(gate.shape, dtype=dt, buffer=nl.shared_hbm)
    C = CHUNK_BYTES // dt.itemsize
    segs = _flat_segments([dout, gate, up, d_gate, d_up], P)
    do_r = nl.ndarray((P, _NBUF, C), dtype=dt, buffer=nl.sbuf)
    g_r = nl.ndarray((P, _NBUF, C), dtype=dt, buffer=nl.sbuf)
    u_r = nl.ndarray((P, _NBUF, C), dtype=dt, buffer=nl.sbuf)
    for i, (si, rows, c0, cw) in enumerate(_chunks(segs, C)):
        do_v, g_v, u_v, dg_v, du_v = segs[si][2]
        b = i % _NBUF
        do_t = do_r[0:rows, b, 0:cw]
        g_t = g_r[0:rows, b, 0:cw]
        u_t = u_r[0:rows, b, 0:cw]
        nisa.dma_copy(dst=g_t, src=g_v[:, c0:c0 + cw])
        nisa.dma_copy(dst=do_t, src=do_v[:, c0:c0 + cw])
        nisa.dma_copy(dst=u_t, src=u_v[:, c0:c0 + cw])

        s_t = nl.ndarray((P, C), dtype=dt, buffer=nl.sbuf)
        nisa.activation(dst=s_t[0:rows, 0:cw], op=nl.silu, data=g_t)
        sd_t = nl.ndarray((P, C), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=sd_t[0:rows, 0:cw], op=nl.silu_dx, data=g_t)
        du_t = nl.ndarray((P, C), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=du_t[0:rows, 0:cw], data1=do_t, data2=s_t[0:rows, 0:cw], op=nl.multiply)
        nisa.dma_copy(dst=du_v[:, c0:c0 + cw], src=du_t[0:rows, 0:cw])
        p_t = nl.ndarray((P, C), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=p_t[0:rows, 0:cw], data1=do_t, data2=u_t, op=nl.multiply)
        dg_t = nl.ndarray((P, C), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=dg_t[0:rows, 0:cw], data1=p_t[0:rows, 0:cw], data2=sd_t[0:rows, 0:cw],
                           op=nl.multiply)
        nisa.dma_copy(dst=dg_v[:, c0:c0 + cw], src=dg_t[0:rows, 0:cw])
    return d_gate, d_up


# --------------------------------------------------------------------------- torch-level launchers

_DTYPES = ("torch.bfloat16", "torch.float32")


def _check(tensors):
    ref_name, ref = tensors[0]
    for name, t in tensors:
        if str(t.dtype) not in _DTYPES:
            raise ValueError(f"kernels/swiglu.py: {name} has dtype {t.dtype}; supported dtypes are "
                             f"bfloat16 and float32")
        if t.dim() != 2:
            raise ValueError(f"kernels/swiglu.py: {name} must be 2-D [rows, width], got shape {tuple(t.shape)}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"kernels/swiglu.py: {name} shape {tuple(t.shape)} != {ref_name} shape "
                             f"{tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise ValueError(f"kernels/swiglu.py: {name} dtype {t.dtype} != {ref_name} dtype {ref.dtype}")
    if ref.shape[0] < 1 or ref.shape[1] < 1:
        raise ValueError(f"kernels/swiglu.py: {ref_name} shape {tuple(ref.shape)} is empty")


def swiglu_fwd(gate2d, up2d):
    """silu(gate2d) * up2d for 2-D [N, F] tensors (any N, any F)."""
    _check([("gate2d", gate2d), ("up2d", up2d)])
    return swiglu_fwd_kernel(gate2d.contiguous(), up2d.contiguous())


def swiglu_bwd(dout2d, gate2d, up2d):
    """-> (dgate2d, dup2d), the gradients of swiglu_fwd."""
    _check([("gate2d", gate2d), ("up2d", up2d), ("dout2d", dout2d)])
    return swiglu_bwd_kernel(dout2d.contiguous(), gate2d.contiguous(), up2d.contiguous())
