"""Fused SwiGLU activation, forward and backward, as NKI kernels (trn1, NeuronCore-v2).

Reference: ``kernels.reference.swiglu_ref`` (forward) and ``swiglu_bwd_ref`` (backward).
Op:        ``kernels.ops.swiglu``.   Tests: ``tests/test_kernel_swiglu.py``.

Math and numerics (all intermediate values fp32, one rounding to the input dtype per output):
    forward   out    = silu(gate) * up                      silu on ScalarE, product on VectorE
    backward  d_up   = dout * silu(gate)
              d_gate = dout * up * silu'(gate),   silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
                                                  (ScalarE activation nl.silu_dx)
PyTorch in bf16 rounds silu(gate) to bf16 before the product; the kernel does not.

Layout: rows on the 128 partitions (tail tile of N % 128 rows by min()-clamped slices), columns in
chunks of 2048, so any width works (Llama 2 70B's FFN at TP=1 is 28672 = 14 chunks). Each input tile is
read once and each output tile written once (minimum HBM bytes).
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

_CHUNK = 2048


@nki.jit
def swiglu_fwd_kernel(gate, up):
    """gate, up [N, F] (bf16|fp32) -> out [N, F] same dtype.

    SBUF per partition (fp32): gate 8 KiB + up 8 KiB + silu 8 KiB + out 8 KiB = 32 KiB. No PSUM.
    """
    n_rows, width = gate.shape
    P = nl.tile_size.pmax
    dt = gate.dtype
    out = nl.ndarray((n_rows, width), dtype=dt, buffer=nl.shared_hbm)
    for r0 in range(0, n_rows, P):
        rows = min(P, n_rows - r0)
        for c0 in range(0, width, _CHUNK):
            cw = min(_CHUNK, width - c0)
            g_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.dma_copy(dst=g_t[0:rows, 0:cw], src=gate[r0:r0 + rows, c0:c0 + cw])
            u_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.dma_copy(dst=u_t[0:rows, 0:cw], src=up[r0:r0 + rows, c0:c0 + cw])
            s_t = nl.ndarray((P, _CHUNK), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=s_t[0:rows, 0:cw], op=nl.silu, data=g_t[0:rows, 0:cw])
            o_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=o_t[0:rows, 0:cw], data1=s_t[0:rows, 0:cw], data2=u_t[0:rows, 0:cw],
                               op=nl.multiply)
            nisa.dma_copy(dst=out[r0:r0 + rows, c0:c0 + cw], src=o_t[0:rows, 0:cw])
    return out


@nki.jit
def swiglu_bwd_kernel(dout, gate, up):
    """dout, gate, up [N, F] -> (d_gate, d_up) [N, F] in gate.dtype.

    SBUF per partition (fp32): 3 inputs 24 KiB + silu, silu' and dout*up fp32 24 KiB + 2 outputs
    16 KiB = 64 KiB. No PSUM.
    """
    n_rows, width = gate.shape
    P = nl.tile_size.pmax
    dt = gate.dtype
    f32 = nl.float32
    d_gate = nl.ndarray((n_rows, width), dtype=dt, buffer=nl.shared_hbm)
    d_up = nl.ndarray((n_rows, width), dtype=dt, buffer=nl.shared_hbm)
    for r0 in range(0, n_rows, P):
        rows = min(P, n_rows - r0)
        for c0 in range(0, width, _CHUNK):
            cw = min(_CHUNK, width - c0)
            do_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.dma_copy(dst=do_t[0:rows, 0:cw], src=dout[r0:r0 + rows, c0:c0 + cw])
            g_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.dma_copy(dst=g_t[0:rows, 0:cw], src=gate[r0:r0 + rows, c0:c0 + cw])
            u_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.dma_copy(dst=u_t[0:rows, 0:cw], src=up[r0:r0 + rows, c0:c0 + cw])

            s_t = nl.ndarray((P, _CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.activation(dst=s_t[0:rows, 0:cw], op=nl.silu, data=g_t[0:rows, 0:cw])
            du_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=du_t[0:rows, 0:cw], data1=do_t[0:rows, 0:cw], data2=s_t[0:rows, 0:cw],
                               op=nl.multiply)
            nisa.dma_copy(dst=d_up[r0:r0 + rows, c0:c0 + cw], src=du_t[0:rows, 0:cw])

            sd_t = nl.ndarray((P, _CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.activation(dst=sd_t[0:rows, 0:cw], op=nl.silu_dx, data=g_t[0:rows, 0:cw])
            du2 = nl.ndarray((P, _CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=du2[0:rows, 0:cw], data1=do_t[0:rows, 0:cw], data2=u_t[0:rows, 0:cw],
                               op=nl.multiply)
            dg_t = nl.ndarray((P, _CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=dg_t[0:rows, 0:cw], data1=du2[0:rows, 0:cw], data2=sd_t[0:rows, 0:cw],
                               op=nl.multiply)
            nisa.dma_copy(dst=d_gate[r0:r0 + rows, c0:c0 + cw], src=dg_t[0:rows, 0:cw])
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
