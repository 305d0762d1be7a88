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

import itertools

from kernels.nki_compat import nki, nl, nisa

# Launch limits. MAX_HIDDEN is set by the backward's SBUF budget at fp32 (see rms_norm_bwd_kernel).
MAX_HIDDEN = 8192
_FWD_CHUNK_BYTES = 16384   # bytes per partition of the forward's column chunk (whole row at bf16, H <= 8192)
_VEC_SHARE = 0.34          # share of the x * rstd columns done on VectorE (the rest on ScalarE)
_PSUM_F = 512          # fp32 elements of one PSUM bank per partition (nl.tile_size.psum_fmax on trn1)
_PSUM_BANK = 2048      # bytes of one PSUM bank per partition (trn1: 8 banks x 2 KiB)
_BWD_TEMP_BYTES = 24 * 1024   # SBUF per partition of the backward's chunk temporaries (budget in its docstring)


def _broadcast_row(w_row_hbm, n_part, width, dtype):
    """Return an SBUF tile [n_part, width] holding the HBM row w_row_hbm [1, width] on every partition (one DMA
    of the row into partition 0, then _broadcast)."""
    w_row = nl.ndarray((1, width), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_row, src=w_row_hbm)
    return _broadcast(w_row, n_part, width, dtype)


def _broadcast(w_row, n_part, width, dtype):
    """[n_part, width] SBUF copies of the SBUF row w_row [1, width]: per <=512-column chunk a TensorE matmul
    ones[1, n_part].T @ w[1, chunk] -> PSUM [n_part, chunk] (fp32, exact for a product with 1.0) evicted to
    SBUF by tensor_copy. nc_matmul: dst = stationary.T @ moving, K = partition dim (here 1).
    """
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


def _row_consts(r, rows, k, dt, hidden):
    """Per-row constants of k row tiles from their rstd r [rows, k] fp32: (rr [P, k, 2 or 1] in dt, the moving
    operand of the dw matmuls: rstd split as hi + lo with hi = bf16(rstd), lo = bf16(rstd - hi), so that the
    bf16 matmul carries rstd to ~16 bits; rn [P, k] fp32 = -rstd^2 / H)."""
    P = nl.tile_size.pmax
    f32 = nl.float32
    nr = 1 if dt == f32 else 2
    rr = nl.ndarray((P, k, nr), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=rr[0:rows, :, 0], src=r)
    if nr == 2:
        nisa.tensor_tensor(dst=rr[0:rows, :, 1], data1=r, data2=rr[0:rows, :, 0], op=nl.subtract)
    rn = nl.ndarray((P, k), dtype=f32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=rn[0:rows, :], data=r, op0=nl.multiply, operand0=-1.0 / hidden,
                              op1=nl.multiply, operand1=r)
    return rr, rn


def _column_blocks(w_row, hidden, dt):
    """w_col [P, n_blk] in dt with w_col[i, b] = w[b * 128 + i] (w as 128-row column blocks, the moving operand
    of the row-sum matmuls): per block a K=1 matmul w_row[0, block].T @ [[1]] into PSUM (exact), then a copy."""
    P = nl.tile_size.pmax
    n_blk = (hidden + P - 1) // P
    one = nl.ndarray((1, 1), dtype=dt, buffer=nl.sbuf)
    nisa.memset(dst=one, value=1.0)
    ps = nl.ndarray((P, n_blk), dtype=nl.float32, buffer=nl.psum)
    for b in range(n_blk):
        bw = min(P, hidden - b * P)
        nisa.nc_matmul(dst=ps[0:bw, b:b + 1], stationary=w_row[0:1, b * P:b * P + bw], moving=one)
    w_col = nl.ndarray((P, n_blk), dtype=dt, buffer=nl.sbuf)
    n_whole = hidden // P
    if n_whole:
        nisa.tensor_copy(dst=w_col[:, 0:n_whole], src=ps[:, 0:n_whole])
    if n_whole < n_blk:
        bw = hidden - n_whole * P
        nisa.tensor_copy(dst=w_col[0:bw, n_whole:n_blk], src=ps[0:bw, n_whole:n_blk])
    return w_col


def _bwd_plan(hidden, itemsize):
    """(group, (x, dy, g) ring depths) of the backward. group: full row tiles per load DMA (2 while a row is under
    16 KiB per partition, so that each DMA packet moves >= 128 KiB and its fixed setup stays ~4% of it [DMAX]).
    Depths: the deepest set whose SBUF fits trn1's 176 KiB per partition next to w (one row) and the chunk
    temporaries (_BWD_TEMP_BYTES); x and dy three deep (four with pairs) let the loads of row tile t + 2 run
    while tiles t (stage B) and t + 1 (stage A) are in use."""
    row = hidden * itemsize
    plans = ((2, (8, 6, 2)), (2, (6, 4, 2)), (2, (4, 4, 2))) if row < 16 * 1024 else ()
    for group, depths in plans + ((1, (4, 2, 2)), (1, (3, 3, 2)), (1, (3, 2, 2)), (1, (2, 2, 2))):
        if (sum(depths) + 1) * row + _BWD_TEMP_BYTES <= 176 * 1024:
            return group, depths
    return 1, (1, 1, 1)


def _store_chunk(hidden, itemsize):
    """Columns per dx store: the row in equal parts of at most 8 KiB per partition (64 KiB DMA packets, setup
    ~8% of a packet [DMAX]), multiples of 512 (one PSUM bank of D) where the row allows."""
    parts = -(-hidden * itemsize // 8192)
    return -(-hidden // parts // _PSUM_F) * _PSUM_F


@nki.jit
def rms_norm_bwd_kernel(dy, x, w, rstd):
    """dy, x [N, H] (bf16|fp32), w [1, H], rstd [N, 1] fp32; returns (dx [N, H] x.dtype, dw [1, H] w.dtype).

    Per row tile (rows on partitions), with p = dy * x and g = dy * w, both rounded to x.dtype (g as PyTorch's
    bf16 autograd rounds it):
      stage A, per unit of columns (one PSUM bank of transposed 128-column blocks: 1024 columns at bf16, 512
        at fp32): VectorE p and g (bf16 fast path); TensorE dw_ps[b] += p[:, b].T @ [rstd_hi, rstd_lo] per
        128-column block b (fp32 PSUM across all row tiles) and p[:, b].T into PSUM (nc_transpose); ScalarE
        copies the transposed blocks to SBUF; TensorE s += p[:, b] @ w[b] (the transposed block as stationary,
        w's column block as moving), issued one unit late so that TensorE does not wait on the copy. After the
        last unit, ScalarE builds the diagonals diag(c_k) of the bf16 pieces c_k of c = -rstd^2 * s / H (fp32;
        see Sums for how many pieces).
      stage B, per 512-column bank: PSUM D = I @ g + sum_k diag(c_k) @ x (TensorE, bf16 operands, each product
        exact, fp32 accumulation), dx = rstd * D (ScalarE, fp32, rounded once to x.dtype); stores of up to 8 KiB
        per partition.
    Program order interleaves stage A of row tile t + 1 with stage B of tile t unit by unit, so that each
    in-order engine queue alternates between the two tiles and the diagonals of tile t are built (at the end
    of its stage A) before stage B of t needs them. Loads: full row tiles in pairs (one DMA per tensor and
    pair) where a row is under 16 KiB per partition, except the first and last two tiles; x and dy rings as
    deep as SBUF allows (_bwd_plan) so that loads run ahead of compute.
    Sums: s = sum(bf16(dy * x) * w) in fp32 PSUM (each product exact in fp32): it differs from sum(g * x) by
    the roundings of p and g, which the projection term mostly cancels for wide rows; a row of one unit
    (H <= 1024 at bf16, 512 at fp32) takes s = sum(g * x) from VectorE instead (fp32 products of the rounded
    g, exact), which keeps dx within 2x PyTorch's error at H = 1 (measured: the p-based sum broke it at
    H <= 3 and matched PyTorch's error from H ~ 24 on). c reaches the bf16 matmuls of stage B in pieces
    c = c_0 + c_1 (+ c_2), c_0 = bf16(c), c_k = bf16(c - c_0 - .. - c_{k-1}) (each remainder exact in fp32):
    with the exact s three pieces (all 24 bits of c: D = g + c * x cancels to ~eps / x^2 of g at H = 1, or
    wherever g is parallel to x, and two pieces, ~16 bits, left an error ~2^-17 * rstd * |g| against
    PyTorch's few fp32 ulps: 9.7x the bound at bf16 H = 1, tests/test_kernel_rmsnorm.py, cancellation
    tests); with the p-based s two pieces, as the s error (~2^-9 / sqrt(H) relative) is far above 2^-17
    (known defect there: dx ~ 0 with g parallel to x stays 475-600x the bound, xfail test of that file).
    Cost of the third piece: one more K = rows matmul per 512-column bank and three [P, 1] ScalarE steps per
    tile, only for rows of one unit (none of the Llama shapes). dw over the rows of a tile in one fp32 matmul, then
    across tiles in fp32 PSUM, of bf16(dy * x) * rstd (one rounding of the product; PyTorch's bf16 autograd
    rounds dy * bf16(x_hat)). At fp32 every product and sum is fp32 (no hi/lo split).
    SBUF per partition (interpreter peak): 7B (H = 4096 bf16) w 8 KiB + pairs, rings x 8, dy 6, g 2 (128
    KiB) + temporaries (p and its transpose 2 KiB each, dx staging up to 8 KiB, two of each alive while a
    loop rebinds them) = 151 KiB; 70B (H = 8192) single tiles, rings 4, 2, 2 = 165 KiB; fp32 at H = 8192
    one-deep rings (stage A and B of a tile alternate) = 145 KiB. PSUM: at most 5 of trn1's 8 banks (dw, s,
    and the transposes and D of the units in flight).
    """
    n_rows, hidden = x.shape
    P = nl.tile_size.pmax
    dt = x.dtype
    f32 = nl.float32
    nr = 1 if dt == f32 else 2
    dx = nl.ndarray((n_rows, hidden), dtype=dt, buffer=nl.shared_hbm)
    dw = nl.ndarray((1, hidden), dtype=w.dtype, buffer=nl.shared_hbm)

    w_row = nl.ndarray((1, hidden), dtype=w.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_row, src=w)
    w_b = _broadcast(w_row, P, hidden, w.dtype)
    w_col = _column_blocks(w_row, hidden, dt)
    del w_row                  # a [1, H] tile holds its bytes on every partition (the interpreter's allocator)
    ident = nl.shared_identity_matrix(P, dtype=dt)
    n_tiles = (n_rows + P - 1) // P
    n_full = n_rows // P
    n_blk = (hidden + P - 1) // P
    tb = _PSUM_BANK // (P * dt.itemsize)           # transposed [128, 128] blocks per PSUM bank
    unit = tb * P
    store_chunk = _store_chunk(hidden, dt.itemsize)
    group, depths = _bwd_plan(hidden, dt.itemsize)
    # loads[t] = (t, k): stage A of tile t loads tiles t .. t + k - 1 (k = group: one DMA per tensor and pair,
    # ring slots aligned; the first and last two tiles singly, so that compute starts sooner and the drain is
    # shorter). Tiles of a pair after its first are absent.
    loads = {}
    t = 0
    while t < n_tiles:
        k = group if 2 <= t and t + group <= n_full - 2 and t % group == 0 else 1
        loads[t] = (t, k)
        t += k
    x_r, dy_r, g_r = (nl.ndarray((P, d, hidden), dtype=dt, buffer=nl.sbuf) for d in depths)
    dw_ps = nl.ndarray((P, n_blk * nr), dtype=f32, buffer=nl.psum)
    # row sums s of tiles t and t + 1; rows of one unit take s = sum(g * x) from VectorE (docstring: Sums)
    exact_s = hidden <= unit
    s_acc = nl.ndarray((P, 2), dtype=f32, buffer=nl.sbuf if exact_s else nl.psum)
    # bf16 pieces of c on the diagonals of stage B (docstring: Sums): 3 (all 24 bits) with the exact s, 2 (~16 bits,
    # below the error of the p-based s) otherwise; fp32: c itself
    n_c = 1 if dt == f32 else (3 if exact_s else 2)

    consts = []
    if n_full:
        r_all = nl.ndarray((P, n_full), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=r_all, src=rstd[0:n_full * P, :].reshape((n_full, P)).permute((1, 0)))
        rr, rn = _row_consts(r_all, P, n_full, dt, hidden)
        consts += [(r_all[:, t:t + 1], rr[:, t, :], rn[:, t:t + 1]) for t in range(n_full)]
    if n_full < n_tiles:
        rows = n_rows - n_full * P
        r_tl = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
        nisa.dma_copy(dst=r_tl[0:rows, :], src=rstd[n_full * P:n_rows, :])
        rr, rn = _row_consts(r_tl[0:rows, :], rows, 1, dt, hidden)
        consts.append((r_tl[0:rows, :], rr[0:rows, 0, :], rn[0:rows, 0:1]))

    def tiles(t):
        rows = min(P, n_rows - t * P)
        return rows, tuple(buf[0:rows, t % d, :] for buf, d in zip((x_r, dy_r, g_r), depths))

    def row_sums(t, rows, pt, u0, first):
        """s[t] (+)= p[:, b] @ w[b] for the blocks of the unit at column u0 (pt: their transposes in SBUF)."""
        for j in range((min(unit, hidden - u0) + P - 1) // P):
            b = u0 // P + j
            bw = min(P, hidden - b * P)
            nisa.nc_matmul(dst=s_acc[0:rows, t % 2:t % 2 + 1], stationary=pt[0:bw, j, 0:rows],
                           moving=w_col[0:bw, b:b + 1], accumulate=not (first and j == 0))

    def stage_a(t):
        """Generator: one step per unit of columns."""
        rows, (x_t, dy_t, g_t) = tiles(t)
        if t in loads:
            t0, k = loads[t]
            for buf, src, d in ((x_r, x, depths[0]), (dy_r, dy, depths[1])):
                if k == 1:
                    nisa.dma_copy(dst=buf[0:rows, t % d, :], src=src[t * P:t * P + rows, :])
                else:       # rows [t0 * P, (t0 + k) * P) as [P, k, H]: row t0 * P + j * P + i -> [i, slot + j]
                    view = src[t0 * P:(t0 + k) * P, :].reshape((k, P, hidden)).permute((1, 0, 2))
                    nisa.dma_copy(dst=buf[:, t0 % d:t0 % d + k, :], src=view)
        rr = consts[t][1][0:rows, :]
        pending = None
        for u0 in range(0, hidden, unit):
            uw = min(unit, hidden - u0)
            cs = slice(u0, u0 + uw)
            p = nl.ndarray((P, unit), dtype=dt, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=p[0:rows, 0:uw], data1=dy_t[:, cs], data2=x_t[:, cs], op=nl.multiply)
            nisa.tensor_tensor(dst=g_t[:, cs], data1=dy_t[:, cs], data2=w_b[0:rows, cs], op=nl.multiply)
            nbk = (uw + P - 1) // P
            for j in range(nbk):
                b0 = u0 + j * P
                bw, b = min(P, hidden - b0), b0 // P
                nisa.nc_matmul(dst=dw_ps[0:bw, nr * b:nr * b + nr], stationary=p[0:rows, j * P:j * P + bw],
                               moving=rr, accumulate=t > 0)
            if exact_s:
                q = nl.ndarray((P, unit), dtype=f32, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=q[0:rows, 0:uw], data1=g_t[:, cs], data2=x_t[:, cs], op=nl.multiply)
                nisa.tensor_reduce(dst=s_acc[0:rows, t % 2:t % 2 + 1], op=nl.add, data=q[0:rows, 0:uw], axis=1,
                                   keepdims=True)
                yield
                continue
            pt_ps = nl.ndarray((P, tb, P), dtype=dt, buffer=nl.psum)
            for j in range(nbk):
                bw = min(P, hidden - u0 - j * P)
                nisa.nc_transpose(dst=pt_ps[0:bw, j, 0:rows], data=p[0:rows, j * P:j * P + bw])
            pt = nl.ndarray((P, tb, P), dtype=dt, buffer=nl.sbuf)
            whole = nbk if uw % P == 0 else nbk - 1
            if whole:
                nisa.activation(dst=pt[:, 0:whole, 0:rows], op=nl.copy, data=pt_ps[:, 0:whole, 0:rows])
            if whole < nbk:
                bw = uw - whole * P
                nisa.activation(dst=pt[0:bw, whole, 0:rows], op=nl.copy, data=pt_ps[0:bw, whole, 0:rows])
            if pending is not None:
                row_sums(t, rows, *pending)
            pending = (pt, u0, u0 == 0)
            yield
        if pending is not None:
            row_sums(t, rows, *pending)
        diags[t] = diagonals(t, rows)

    def diagonals(t, rows):
        """diag of each bf16 piece of c = -rstd^2 * s / H of row tile t (n_c pieces, docstring: Sums), or [diag(c)]
        at fp32. Pieces: c_0 = bf16(c), r_1 = c - c_0 (fp32, exact), c_1 = bf16(r_1), r_2 = r_1 - c_1, c_2 = bf16(r_2);
        each r_k is exact in fp32 and three pieces of 8 bits hold all 24 bits of c."""
        c = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
        nisa.activation(dst=c[0:rows, :], op=nl.copy, data=s_acc[0:rows, t % 2:t % 2 + 1], scale=consts[t][2])
        out = [nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf) for _ in range(n_c)]
        r = c
        for k in range(n_c):
            # the diagonal ident * r rounds r once to dt: piece c_k on the diagonal
            nisa.activation(dst=out[k][0:rows, 0:rows], op=nl.copy, data=ident[0:rows, 0:rows], scale=r[0:rows, :])
            if k + 1 < n_c:
                c_k = nl.ndarray((P, 1), dtype=dt, buffer=nl.sbuf)
                nisa.activation(dst=c_k[0:rows, :], op=nl.copy, data=r[0:rows, :])
                r_next = nl.ndarray((P, 1), dtype=f32, buffer=nl.sbuf)
                nisa.activation(dst=r_next[0:rows, :], op=nl.copy, data=c_k[0:rows, :], scale=-1.0, bias=r[0:rows, :])
                r = r_next
        return out

    def stage_b(t):
        """Generator: one step per unit of columns (as stage_a)."""
        rows, (x_t, _, g_t) = tiles(t)
        r = consts[t][0]
        dg = diags.pop(t)
        # the last tile's stores in units: they follow its compute closely (the kernel's drain)
        chunk = unit if t == n_tiles - 1 else store_chunk
        for k0 in range(0, hidden, chunk):
            kw = min(chunk, hidden - k0)
            dx_t = nl.ndarray((P, chunk), dtype=dt, buffer=nl.sbuf)
            for c0 in range(k0, k0 + kw, _PSUM_F):
                cw = min(_PSUM_F, k0 + kw - c0)
                cs = slice(c0, c0 + cw)
                dp = nl.ndarray((P, _PSUM_F), dtype=f32, buffer=nl.psum)
                nisa.nc_matmul(dst=dp[0:rows, 0:cw], stationary=ident[0:rows, 0:rows], moving=g_t[:, cs],
                               accumulate=False)
                for d in dg:
                    nisa.nc_matmul(dst=dp[0:rows, 0:cw], stationary=d[0:rows, 0:rows], moving=x_t[:, cs],
                                   accumulate=True)
                nisa.activation(dst=dx_t[0:rows, c0 - k0:c0 - k0 + cw], op=nl.copy, data=dp[0:rows, 0:cw], scale=r)
                if c0 + cw == k0 + kw:
                    nisa.dma_copy(dst=dx[t * P:t * P + rows, k0:k0 + kw], src=dx_t[0:rows, 0:kw])
                if (c0 + cw) % unit == 0 or c0 + cw == hidden:
                    yield

    diags = {}
    if depths[0] > 1:
        # unit j of stage B of tile t follows unit j of stage A of tile t + 1 (trailing further measured slower)
        n_units = (hidden + unit - 1) // unit
        steps_a = itertools.chain.from_iterable(stage_a(t) for t in range(n_tiles))
        steps_b = itertools.chain.from_iterable(stage_b(t) for t in range(n_tiles))
        for _ in itertools.islice(steps_a, n_units):
            pass
        for _ in itertools.zip_longest(steps_a, steps_b):
            pass
    else:                      # one-deep rings: stage A of t + 1 would overwrite what stage B of t reads
        for t in range(n_tiles):
            for _ in itertools.chain(stage_a(t), stage_b(t)):
                pass

    # dw[b * 128 + i] = dw_ps[i, nr * b] (+ dw_ps[i, nr * b + 1], the rstd_lo part)
    acc = nl.ndarray((P, n_blk * nr), dtype=f32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=acc, src=dw_ps)
    dw_t = nl.ndarray((P, n_blk), dtype=w.dtype, buffer=nl.sbuf)
    if nr == 2:
        nisa.tensor_tensor(dst=dw_t, data1=acc[:, 0:2 * n_blk:2], data2=acc[:, 1:2 * n_blk:2], op=nl.add)
    else:
        nisa.tensor_copy(dst=dw_t, src=acc)
    n_whole = hidden // P
    if n_whole:
        nisa.dma_copy(dst=dw[0:1, 0:n_whole * P].reshape((n_whole, P)).permute((1, 0)), src=dw_t[:, 0:n_whole])
    if n_whole < n_blk:
        bw = hidden - n_whole * P
        nisa.dma_copy(dst=dw[0:1, n_whole * P:hidden], src=dw_t[0:bw, n_whole:n_blk])
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
