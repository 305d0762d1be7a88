"""Fused RMSNorm forward and backward as NKI kernels (trn1, NeuronCore-v2).

Reference: ``kernels.reference.rms_norm_ref`` (forward) and ``rms_norm_bwd_ref`` (backward).
Op:        ``kernels.ops.rms_norm``.   Tests: ``tests/test_kernel_rmsnorm.py``.

Math and numerics (Llama's casting order):
    rstd  = rsqrt(mean(x^2, -1) + eps)                 fp32 (sum of squares accumulated in fp32)
    x_hat = x * rstd                                   fp32
    y     = cast(cast(x_hat, x.dtype) * w, x.dtype)    product computed in fp32, one rounding
Backward, with g = dy * w (fp32):
    dw = sum_rows(dy * x_hat)                          fp32 over all rows, cast to w.dtype at the end
    dx = rstd * (g - x_hat * mean(g * x_hat))  =  rstd * g - rstd^3 * sum(g * x) / H * x
The forward's cast of x_hat to x.dtype is a rounding of x_hat with identity gradient (as in PyTorch
autograd); dw uses the fp32 x_hat rather than its bf16 rounding, which is the closer value to the exact
(float64) gradient and saves an instruction. All sums and products of the backward are fp32.

Layout: rows on the 128 partitions (tail tile of N % 128 rows uses min()-clamped slices), the hidden
dim on the free axis, processed in column chunks so that the live SBUF stays inside trn1's 176 KiB per
partition (budget written next to each kernel). The weight row is read from HBM once per launch and
broadcast to all partitions on TensorE with a ones-vector matmul (K=1 contraction), which is legal on
NeuronCore-v2 and costs H/512 small matmuls; a stride-0 DMA from HBM would re-read w 128 times and
break the 1.1x minimum-bytes target for small N.
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

# Launch limits. MAX_HIDDEN is set by the backward's SBUF budget at fp32 (see rms_norm_bwd_kernel).
MAX_HIDDEN = 8192
_FWD_CHUNK_BYTES = 16384   # bytes per partition of the forward's column chunk (whole row at bf16, H <= 8192)
_VEC_SHARE = 0.34          # share of the x * rstd columns done on VectorE (the rest on ScalarE)
_BWD_CHUNK = 1024      # free-dim chunk of the backward's fp32 temporaries
_PSUM_F = 512          # fp32 elements of one PSUM bank per partition (nl.tile_size.psum_fmax on trn1)


def _broadcast_row(w_row_hbm, n_part, width, dtype):
    """Return an SBUF tile [n_part, width] holding the HBM row w_row_hbm [1, width] on every partition.

    One DMA of the row into partition 0, then per <=512-column chunk a TensorE matmul
    ones[1, n_part].T @ w[1, chunk] -> PSUM [n_part, chunk] (fp32, exact for a product with 1.0)
    evicted to SBUF by tensor_copy. nc_matmul: dst = stationary.T @ moving, K = partition dim (here 1).
    """
    w_row = nl.ndarray((1, width), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_row, src=w_row_hbm)
    ones = nl.ndarray((1, n_part), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    w_b = nl.ndarray((n_part, width), dtype=dtype, buffer=nl.sbuf)
    for c0 in range(0, width, _PSUM_F):
        cw = min(_PSUM_F, width - c0)
        ps = nl.ndarray((n_part, _PSUM_F), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps[:, 0:cw], stationary=ones, moving=w_row[:, c0:c0 + cw])
        nisa.tensor_copy(dst=w_b[:, c0:c0 + cw], src=ps[:, 0:cw])
    return w_b


@nki.jit
def rms_norm_fwd_kernel(x, w, eps):
    """x [N, H] (bf16|fp32, HBM), w [1, H] same dtype; returns (y [N, H] x.dtype, rstd [N, 1] fp32).

    Software-pipelined over row tiles: stage A (load x, sum of squares, rstd) of tile t + 1 is issued before
    stage B (x * rstd, * w, store y) of tile t, so ScalarE never waits on its own rstd. Work per element:
    ScalarE square-and-sum (one instruction per column chunk) plus x * rstd on the columns from _VEC_SHARE
    on; VectorE x * rstd on the first _VEC_SHARE of the columns and the product with w (bf16 fast path),
    which balances the two engines (ScalarE 1.4 GHz, VectorE 1.12 GHz) under the HBM time.
    SBUF per partition at H = 8192 fp32: x ring 2 x 32 KiB + w 32 KiB + 4096-column temporaries (squares
    8 KiB bf16, x * rstd and y 16 KiB each, two instances while a loop rebinds them) = 168 KiB; at bf16
    (H <= 8192) a 3-deep x ring: 48 + 16 + 8 + 64 = 136 KiB. PSUM: one bank (broadcast of w).
    """
    n_rows, hidden = x.shape
    P = nl.tile_size.pmax
    dt = x.dtype
    y = nl.ndarray((n_rows, hidden), dtype=dt, buffer=nl.shared_hbm)
    rstd_out = nl.ndarray((n_rows, 1), dtype=nl.float32, buffer=nl.shared_hbm)

    w_b = _broadcast_row(w, P, hidden, w.dtype)
    eps_t = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_t, value=float(eps))
    chunk = _FWD_CHUNK_BYTES // dt.itemsize
    n_chunks = (hidden + chunk - 1) // chunk
    n_tiles = (n_rows + P - 1) // P
    n_full = n_rows // P
    nbuf = 3 if 3 * hidden * dt.itemsize <= 48 * 1024 else 2
    x_r = nl.ndarray((P, nbuf, hidden), dtype=dt, buffer=nl.sbuf)
    # rstd of every full row tile, one column per tile, stored with one DMA at the end.
    rstd_all = nl.ndarray((P, max(1, n_full)), dtype=nl.float32, buffer=nl.sbuf)

    def stage_a(t):
        r0, rows = t * P, min(P, n_rows - t * P)
        x_t = x_r[0:rows, t % nbuf, :]
        nisa.dma_copy(dst=x_t, src=x[r0:r0 + rows, :])
        part = nl.ndarray((P, n_chunks), dtype=nl.float32, buffer=nl.sbuf)
        for c in range(n_chunks):
            c0, cw = c * chunk, min(chunk, hidden - c * chunk)
            sq = nl.ndarray((P, chunk), dtype=nl.bfloat16, buffer=nl.sbuf)   # squares are discarded
            nisa.activation(dst=sq[0:rows, 0:cw], op=nl.square, data=x_t[:, c0:c0 + cw], reduce_op=nl.add,
                            reduce_res=part[0:rows, c:c + 1], reduce_cmd=nisa.reduce_cmd.reset_reduce)
        ss = part
        if n_chunks > 1:
            ss = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_reduce(dst=ss[0:rows, :], op=nl.add, data=part[0:rows, 0:n_chunks], axis=1,
                               keepdims=True)
        # rstd = rsqrt(ss / H + eps); on NeuronCore-v2 the activation bias must be a [P, 1] tile.
        if t < n_full:
            rstd = rstd_all[:, t:t + 1]
        else:
            rstd = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)[0:rows, :]
        nisa.activation(dst=rstd, op=nl.rsqrt, data=ss[0:rows, 0:1], scale=1.0 / hidden, bias=eps_t[0:rows, :])
        if t >= n_full:
            nisa.dma_copy(dst=rstd_out[r0:r0 + rows, :], src=rstd)
        return rstd

    def stage_b(t, rstd):
        r0, rows = t * P, min(P, n_rows - t * P)
        x_t = x_r[0:rows, t % nbuf, :]
        for c in range(n_chunks):
            c0, cw = c * chunk, min(chunk, hidden - c * chunk)
            # xn = cast(x * rstd): fp32 math in the engine, rounded once to x.dtype (Llama's cast);
            # columns [0, v) on VectorE, [v, cw) on ScalarE (activation copy with a per-row scale).
            v = min(cw, max(0, int(cw * _VEC_SHARE) // 64 * 64))
            xn = nl.ndarray((P, chunk), dtype=dt, buffer=nl.sbuf)
            if v:
                nisa.tensor_scalar(dst=xn[0:rows, 0:v], data=x_t[:, c0:c0 + v], op0=nl.multiply, operand0=rstd)
            if v < cw:
                nisa.activation(dst=xn[0:rows, v:cw], op=nl.copy, data=x_t[:, c0 + v:c0 + cw], scale=rstd)
            y_t = nl.ndarray((P, chunk), dtype=dt, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=y_t[0:rows, 0:cw], data1=xn[0:rows, 0:cw], data2=w_b[0:rows, c0:c0 + cw],
                               op=nl.multiply)
            nisa.dma_copy(dst=y[r0:r0 + rows, c0:c0 + cw], src=y_t[0:rows, 0:cw])

    pending = stage_a(0)
    for t in range(n_tiles):
        nxt = stage_a(t + 1) if t + 1 < n_tiles else None
        stage_b(t, pending)
        pending = nxt
    if n_full:
        # rstd_out rows [t * P, (t + 1) * P) are column t of rstd_all: an [n_full, P] HBM block transposed.
        dst = rstd_out[0:n_full * P, :].reshape((n_full, P)).permute((1, 0))
        nisa.dma_copy(dst=dst, src=rstd_all[:, 0:n_full])
    return y, rstd_out


@nki.jit
def rms_norm_bwd_kernel(dy, x, w, rstd):
    """dy, x [N, H] (bf16|fp32), w [1, H], rstd [N, 1] fp32; returns (dx [N, H] x.dtype, dw [1, H] w.dtype).

    Per row tile: pass 1 over column chunks accumulates dw partial sums (per partition, fp32, in SBUF)
    and s = sum(g * x); pass 2 writes dx = a * g + b * x with a = rstd, b = -rstd^3 * s / H.
    After all row tiles, dw is reduced across partitions on TensorE: ones[128, 1].T @ acc[128, <=512]
    (fp32 matmul, fp32 PSUM), one PSUM bank per chunk.
    SBUF per partition at H = 8192 fp32: w broadcast, x tile, dy tile, dw accumulator 4 * 32 KiB
    = 128 KiB, plus 1024-column fp32 chunk temporaries of 4 KiB (up to two instances each while a loop
    rebinds them); the interpreter measures a peak of 152 KiB (fp32) and 102 KiB (bf16) of trn1's
    176 KiB. PSUM: one bank at a time.
    """
    n_rows, hidden = x.shape
    P = nl.tile_size.pmax
    dt = x.dtype
    f32 = nl.float32
    dx = nl.ndarray((n_rows, hidden), dtype=dt, buffer=nl.shared_hbm)
    dw = nl.ndarray((1, hidden), dtype=w.dtype, buffer=nl.shared_hbm)

    w_b = _broadcast_row(w, P, hidden, w.dtype)
    acc = nl.ndarray((P, hidden), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)   # all 128 partitions: the final ones-matmul sums every partition
    n_chunks = (hidden + _BWD_CHUNK - 1) // _BWD_CHUNK

    # Row-tile buffers reused by every row tile (single-buffered: double-buffering both at fp32,
    # H = 8192 would need 192 KiB with the resident w and accumulator).
    x_t = nl.ndarray((P, hidden), dtype=dt, buffer=nl.sbuf)
    dy_t = nl.ndarray((P, hidden), dtype=dy.dtype, buffer=nl.sbuf)
    for r0 in range(0, n_rows, P):
        rows = min(P, n_rows - r0)
        nisa.dma_copy(dst=x_t[0:rows, :], src=x[r0:r0 + rows, :])
        nisa.dma_copy(dst=dy_t[0:rows, :], src=dy[r0:r0 + rows, :])
        r_t = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=r_t[0:rows, :], src=rstd[r0:r0 + rows, :])

        part = nl.ndarray((P, n_chunks), dtype=f32, buffer=nl.sbuf)
        for c in range(n_chunks):
            c0 = c * _BWD_CHUNK
            cw = min(_BWD_CHUNK, hidden - c0)
            xs = x_t[0:rows, c0:c0 + cw]
            dys = dy_t[0:rows, c0:c0 + cw]
            # dw partial: (x * rstd) * dy = x_hat * dy in fp32, one VectorE instruction.
            prod = nl.ndarray((P, _BWD_CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=prod[0:rows, 0:cw], data=xs, op0=nl.multiply,
                                      operand0=r_t[0:rows, :], op1=nl.multiply, operand1=dys)
            nisa.tensor_tensor(dst=acc[0:rows, c0:c0 + cw], data1=acc[0:rows, c0:c0 + cw],
                               data2=prod[0:rows, 0:cw], op=nl.add)
            g = nl.ndarray((P, _BWD_CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=g[0:rows, 0:cw], data1=dys, data2=w_b[0:rows, c0:c0 + cw], op=nl.multiply)
            gx = nl.ndarray((P, _BWD_CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=gx[0:rows, 0:cw], data1=g[0:rows, 0:cw], data2=xs, op=nl.multiply)
            nisa.tensor_reduce(dst=part[0:rows, c:c + 1], op=nl.add, data=gx[0:rows, 0:cw], axis=1,
                               keepdims=True)

        s = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=s[0:rows, :], op=nl.add, data=part[0:rows, 0:n_chunks], axis=1, keepdims=True)
        # b = -(rstd^3) * s / H, built from [P, 1] operands (tensor_scalar operands are fp32 [P, 1] tiles).
        r2 = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=r2[0:rows, :], data1=r_t[0:rows, :], data2=r_t[0:rows, :], op=nl.multiply)
        b = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=b[0:rows, :], data=s[0:rows, :], op0=nl.multiply, operand0=r2[0:rows, :],
                           op1=nl.multiply, operand1=-1.0 / hidden)
        nisa.tensor_scalar(dst=b[0:rows, :], data=b[0:rows, :], op0=nl.multiply, operand0=r_t[0:rows, :])

        for c in range(n_chunks):
            c0 = c * _BWD_CHUNK
            cw = min(_BWD_CHUNK, hidden - c0)
            g = nl.ndarray((P, _BWD_CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=g[0:rows, 0:cw], data1=dy_t[0:rows, c0:c0 + cw],
                               data2=w_b[0:rows, c0:c0 + cw], op=nl.multiply)
            t = nl.ndarray((P, _BWD_CHUNK), dtype=f32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=t[0:rows, 0:cw], data=x_t[0:rows, c0:c0 + cw], op0=nl.multiply,
                               operand0=b[0:rows, :])
            dx_t = nl.ndarray((P, _BWD_CHUNK), dtype=dt, buffer=nl.sbuf)
            nisa.scalar_tensor_tensor(dst=dx_t[0:rows, 0:cw], data=g[0:rows, 0:cw], op0=nl.multiply,
                                      operand0=r_t[0:rows, :], op1=nl.add, operand1=t[0:rows, 0:cw])
            nisa.dma_copy(dst=dx[r0:r0 + rows, c0:c0 + cw], src=dx_t[0:rows, 0:cw])

    # Cross-partition reduction of the fp32 partial sums: dw[0, c] = sum_p acc[p, c].
    ones = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    for c0 in range(0, hidden, _PSUM_F):
        cw = min(_PSUM_F, hidden - c0)
        ps = nl.ndarray((1, _PSUM_F), dtype=f32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps[:, 0:cw], stationary=ones, moving=acc[:, c0:c0 + cw])
        dw_t = nl.ndarray((1, _PSUM_F), dtype=w.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=dw_t[:, 0:cw], src=ps[:, 0:cw])
        nisa.dma_copy(dst=dw[:, c0:c0 + cw], src=dw_t[:, 0:cw])
    return dx, dw


# --------------------------------------------------------------------------- torch-level launchers

_DTYPES = ("torch.bfloat16", "torch.float32")


def _check_float(name, t):
    if str(t.dtype) not in _DTYPES:
        raise ValueError(f"kernels/rmsnorm.py: {name} has dtype {t.dtype}; supported dtypes are "
                         f"bfloat16 and float32")


def _check_2d(name, t, hidden=None):
    if t.dim() != 2:
        raise ValueError(f"kernels/rmsnorm.py: {name} must be 2-D [rows, hidden], got shape {tuple(t.shape)}")
    n, h = t.shape
    if n < 1 or h < 1:
        raise ValueError(f"kernels/rmsnorm.py: {name} shape {tuple(t.shape)} is empty")
    if h > MAX_HIDDEN:
        raise ValueError(f"kernels/rmsnorm.py: {name} hidden size {h} exceeds the limit MAX_HIDDEN="
                         f"{MAX_HIDDEN} (SBUF budget of the backward at fp32: 176 KiB per partition)")
    if hidden is not None and h != hidden:
        raise ValueError(f"kernels/rmsnorm.py: {name} has shape {tuple(t.shape)}, expected hidden size {hidden}")


def _check_weight(weight, x2d):
    h = x2d.shape[1]
    if weight.dim() != 1 or weight.shape[0] != h:
        raise ValueError(f"kernels/rmsnorm.py: weight has shape {tuple(weight.shape)}, expected ({h},)")
    if weight.dtype != x2d.dtype:
        raise ValueError(f"kernels/rmsnorm.py: weight dtype {weight.dtype} differs from x dtype {x2d.dtype}; "
                         f"the kernel requires equal dtypes (cast the weight first)")


def rms_norm_fwd(x2d, weight, eps):
    """Launch the forward kernel: x2d [N, H], weight [H] -> (y2d [N, H] x.dtype, rstd [N] fp32)."""
    _check_float("x2d", x2d)
    _check_2d("x2d", x2d)
    _check_weight(weight, x2d)
    eps = float(eps)
    if not eps > 0.0:
        raise ValueError(f"kernels/rmsnorm.py: eps must be > 0, got {eps}")
    n, h = x2d.shape
    y, rstd = rms_norm_fwd_kernel(x2d.contiguous(), weight.contiguous().reshape(1, h), eps=eps)
    return y, rstd.reshape(n)


def rms_norm_bwd(dy2d, x2d, weight, rstd):
    """Launch the backward kernel -> (dx2d [N, H] x.dtype, dweight [H] weight.dtype, fp32-reduced)."""
    _check_float("x2d", x2d)
    _check_2d("x2d", x2d)
    _check_float("dy2d", dy2d)
    _check_2d("dy2d", dy2d, hidden=x2d.shape[1])
    _check_weight(weight, x2d)
    n, h = x2d.shape
    if dy2d.shape[0] != n:
        raise ValueError(f"kernels/rmsnorm.py: dy2d shape {tuple(dy2d.shape)} != x2d shape {tuple(x2d.shape)}")
    if dy2d.dtype != x2d.dtype:
        raise ValueError(f"kernels/rmsnorm.py: dy2d dtype {dy2d.dtype} differs from x2d dtype {x2d.dtype}")
    if tuple(rstd.shape) != (n,) or str(rstd.dtype) != "torch.float32":
        raise ValueError(f"kernels/rmsnorm.py: rstd must be float32 of shape ({n},), got "
                         f"{rstd.dtype} {tuple(rstd.shape)}")
    dx, dw = rms_norm_bwd_kernel(dy2d.contiguous(), x2d.contiguous(), weight.contiguous().reshape(1, h),
                                 rstd.contiguous().reshape(n, 1))
    return dx, dw.reshape(h)
