"""Flash attention with native GQA, forward and backward, as NKI kernels (trn1, NeuronCore-v2).

Reference: ``kernels.reference.flash_attention_ref`` (forward) and ``flash_attention_bwd_ref`` (backward).
Op:        ``kernels.ops.flash_attention``.   Tests: ``tests/test_kernel_attention.py``.

Shapes: q, o, do [B, Hq, S, D]; k, v [B, Hkv, S, D] with Hq % Hkv == 0; query head h reads kv head
h // (Hq // Hkv) (GQA by index mapping: K/V are never repeated, in HBM or on chip). lse [B, Hq, S] fp32.
Any S from 1 to MAX_SEQ[dtype] (tails of S % 128 rows use partition-clamped slices); D from 1 to 128.

Math (FlashAttention-2, spec 5.2/5.3), s = q.k (raw scores, fp32 in PSUM), c = softmax_scale > 0:
  forward   two passes per 512-query chunk, no online rescaling: pass 1 m' = row max of s over all the row's
            keys, rounded to the input dtype (the max of the scores rounded to it: rounding is monotonic, so
            the same value; m' is only a shift, used consistently below); pass 2 per 128-key tile
            s^T - m' summed in fp32 PSUM (m' enters by a rank-1 matmul update), p = exp(c*(s - m')) (ScalarE,
            fp32; rounded to the input dtype for the P @ V matmul), [acc | l] = sum P @ [v | 1] (fp32 PSUM:
            l is the row sum of the *rounded* p, the same weights as acc), o = acc / l (one rounding to
            q.dtype), lse = c*m' + log(l) (fp32).
  backward  per 128-query tile and 256-key block: p = exp(c*s - lse) recomputed (fp32, rounded to the input
            dtype for the matmuls), Dlt = rowsum(do * o) (fp32), dp - Dlt = do @ v^T (fp32 PSUM) evicted by
            ScalarE with the per-row bias -Dlt (fp32 arithmetic, rounded to the input dtype), ds = p * (dp - Dlt)
            (VectorE, fp32 arithmetic, rounded to the input dtype for the matmuls),
            dv = sum p^T @ do,  dk = c * sum ds^T @ q,  dq = c * sum ds @ k, all sums fp32 (PSUM, then fp32
            SBUF across blocks); dk/dv also summed over the query heads of the kv head's group inside the
            kernel. Each gradient is rounded once to its input dtype.
Causal: blocks entirely above the diagonal are never computed (each query tile stops at its last key);
only the diagonal 128 x 128 sub-block is masked: the forward's pass 1 *selects* -1e30 in place of the scores
above the diagonal before the row max (the diagonal element is always kept, so every row max is finite), its
pass 2 and the backward select an exact 0 into p. A select,
not an add: a masked key whose score is Inf or NaN (an Inf/NaN or overflowing key) must not reach the row max
or the row sum of an earlier query, and Inf + (-1e30) is still Inf. GpSimd cannot touch PSUM (spec 2.6), so the
pass-1 scores are selected in their SBUF copy (ScalarE copy; or PSUM -> SBUF -> PSUM by Vector copies when
VectorE reads the max from PSUM), and p = exp(...) of the masked keys in SBUF, so a non-finite masked score
never reaches the row max, p, ds or any output. A masked
key's value row still enters P @ V with an exact 0 weight: a non-finite V there gives 0 * Inf = NaN, as in every
matmul-based attention (the reference backend alike).

Layout (contraction on the partition dim, nc_matmul: dst = stationary.T @ moving):
  scores [q, k]  = (q^T [D, q]).T @ k^T [D, k<=512]     q^T, k^T made by TensorE transposes of row tiles
  s^T    [k, q]  = (k^T [D, k]).T @ q^T [D, q<=512] + (ones [1, k]).T @ (-m' [1, q])     forward pass 2
  o|l    [q, D+1] += (p^T [k, q]).T @ [v | 1] [k, D+1]  p^T = exp(c * s^T) is already stationary-shaped
  dp     [q, k]  = (do^T [D, q]).T @ v^T [D, k]
  dv     [k, D] += (p [q, k<=128]).T @ do [q, D]        p and ds are already stationary-shaped: no transpose
  dk     [k, D] += (ds [q, k<=128]).T @ q [q, D]
  dq     [q, D] += (ds^T [k, q]).T @ k [k, D]           ds^T by TensorE transposes
TensorE transposes write PSUM in the data's own dtype ("The output dst tile must have the same data type
as that of data", https://awsdocs-neuron.readthedocs-hosted.com/general/nki/api/generated/nki.isa.nc_transpose.html)
and are evicted to SBUF by a ScalarE activation copy (bit-exact for equal dtypes; the forward's K^T and q^T:
the Vector/Scalar PSUM port is its tightest resource and ScalarE reads PSUM faster; the backward's ds^T,
which keeps VectorE for ds and the dK/dV sums) or a Vector copy (the backward's K^T, V^T, q^T, do^T).

HBM traffic: per (batch, kv head) K and V are read once and stay in SBUF for all the group's query heads;
q, o, do, lse are read once and o, lse, dq, dk, dv written once: the minimum-bytes schedule. The price is
SBUF residency growing with S, hence MAX_SEQ (budgets next to each kernel).
"""
from __future__ import annotations

import math

from kernels.nki_compat import nki, nl, nisa

MAX_HEAD_DIM = 128
# Longest sequence per dtype: the kv head's K/V (forward) or K, K^T, V^T and fp32 dK/dV (backward) stay in
# SBUF; at these lengths (D = 128, causal) the interpreter measures SBUF peaks per partition of 143 KiB forward
# and 156 KiB backward (bf16), 162 KiB and 160 KiB (fp32) of trn1's 176 KiB; tests/test_kernel_attention.py::
# test_longest_supported_sequence_fits_trn1 runs both at these lengths.
MAX_SEQ = {"bfloat16": 8192, "float32": 4096}

_P = 128                 # partitions (nl.tile_size.pmax)
_MM_N = 512              # moving free size / fp32 elements of one PSUM bank (gemm_moving_fmax, psum_fmax)
_BWD_BLOCK = 256         # keys per backward unit (two unit buffers of scores in one PSUM bank)
_BWD_CHUNK_TILES = 8     # 128-row query tiles per backward chunk (dK/dV PSUM sums span 1024 queries)
_CHUNK_TILES = 4         # 128-row tiles per DMA / per transpose group (512 rows)
_BWD_KV_DOUBLE_MAX_SEQ = 4096  # backward: two K/V sets in SBUF (bf16) up to this length
_BWD_LAG_B, _BWD_LAG_C = 3, 4
_BWD_OUT_BUFS = 4        # backward: dK/dV output staging tiles in turn (each store's fixed cost overlaps)   # backward pipeline: stages B and C of unit u emitted with stage A of u + lag
_FWD_P1_LAG = 2          # forward: pass 1 of chunk n + 2 emitted with pass 2 of chunk n
_FWD_S1_BUFS = 3         # forward pass-1 score buffers (PSUM banks) in turn (bf16; fp32: 2)
_FWD_PV_LAG = 2          # forward pass 2: P @ V of key tile t emitted with the scores of tile t + 2
_MASKED = -1.0e30        # selected for masked fp32 scores: exp(c * -1e30 - ...) == 0, no -inf arithmetic


def _dims(q, k):
    """(B, Hq, Hkv, group size, S, D, 128-row tiles of S, rows per query chunk) of q [B,Hq,S,D], k [B,Hkv,S,D]."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    return B, Hq, Hkv, Hq // Hkv, S, D, (S + _P - 1) // _P, _CHUNK_TILES * _P


def _tiles(n_rows):
    """[(row start, rows)] of the 128-row tiles of n_rows."""
    return [(r0, min(_P, n_rows - r0)) for r0 in range(0, n_rows, _P)]


def _load_rows(dst, src, r0, n_rows):
    """DMA rows r0..r0+n_rows of the HBM matrix src [S, D] into dst [128, n_tiles, D] (row r0 + t*128 + p of
    src -> dst[p, t, :]): one DMA for the whole 128-row tiles, one for a partial tail tile."""
    n_full = n_rows // _P
    if n_full:
        view = src[r0:r0 + n_full * _P, :].reshape((n_full, _P, src.shape[1])).permute((1, 0, 2))
        nisa.dma_copy(dst=dst[:, 0:n_full, :], src=view)
    tail = n_rows - n_full * _P
    if tail:
        nisa.dma_copy(dst=dst[0:tail, n_full, :], src=src[r0 + n_full * _P:r0 + n_rows, :])


def _store_rows(dst, src, r0, n_rows):
    """Inverse of _load_rows: SBUF src [128, n_tiles, D] -> rows r0..r0+n_rows of the HBM matrix dst [S, D]."""
    n_full = n_rows // _P
    if n_full:
        view = dst[r0:r0 + n_full * _P, :].reshape((n_full, _P, dst.shape[1])).permute((1, 0, 2))
        nisa.dma_copy(dst=view, src=src[:, 0:n_full, :])
    tail = n_rows - n_full * _P
    if tail:
        nisa.dma_copy(dst=dst[r0 + n_full * _P:r0 + n_rows, :], src=src[0:tail, n_full, :])


def _store_cols(dst, src, r0, n_rows):
    """SBUF src [128, n_tiles] (fp32 per row) -> HBM vector dst [S] at r0..r0+n_rows (row r0 + t*128 + p)."""
    n_full = n_rows // _P
    if n_full:
        view = dst[r0:r0 + n_full * _P].reshape((n_full, _P)).permute((1, 0))
        nisa.dma_copy(dst=view, src=src[:, 0:n_full])
    tail = n_rows - n_full * _P
    if tail:
        nisa.dma_copy(dst=dst[r0 + n_full * _P:r0 + n_rows], src=src[0:tail, n_full:n_full + 1])


def _load_cols(dst, src, r0, n_rows):
    """HBM vector src [S] rows r0..r0+n_rows -> SBUF dst [128, n_tiles] (inverse of _store_cols)."""
    n_full = n_rows // _P
    if n_full:
        view = src[r0:r0 + n_full * _P].reshape((n_full, _P)).permute((1, 0))
        nisa.dma_copy(dst=dst[:, 0:n_full], src=view)
    tail = n_rows - n_full * _P
    if tail:
        nisa.dma_copy(dst=dst[0:tail, n_full:n_full + 1], src=src[r0 + n_full * _P:r0 + n_rows])


def _transpose_rows(dst_t, c0, rows_sb, n_rows, t_ps, scalar_copy=False):
    """dst_t[:, c0:c0+n_rows] (SBUF [D, *]) = transpose of the row tiles rows_sb [128, n_tiles, D] (<= 4 tiles).

    One TensorE transpose per tile into the PSUM tile t_ps [128, 512] (dtype of the data), then one Vector
    copy of the whole group to SBUF."""
    d = rows_sb.shape[2]
    for t, (r0, rows) in enumerate(_tiles(n_rows)):
        nisa.nc_transpose(dst=t_ps[0:d, r0:r0 + rows], data=rows_sb[0:rows, t, :])
    if scalar_copy:
        nisa.activation(dst=dst_t[0:d, c0:c0 + n_rows], op=nl.copy, data=t_ps[0:d, 0:n_rows])
    else:
        nisa.tensor_copy(dst=dst_t[0:d, c0:c0 + n_rows], src=t_ps[0:d, 0:n_rows])


def _load_transposed(dst_t, src, n_rows, stage, t_ps, rows_dst=None):
    """dst_t [D, n_rows] = src[0:n_rows, :]^T for an HBM matrix src [S, D], 512 rows per DMA and transpose group;
    if rows_dst [128, n_tiles, D] is given the row tiles are kept there too (stage is then unused); stage may be a
    list of staging tiles, used in turn (the next group's DMA then overlaps this group's transposes)."""
    stages = stage if isinstance(stage, list) else [stage]
    for r0 in range(0, n_rows, _CHUNK_TILES * _P):
        rows = min(_CHUNK_TILES * _P, n_rows - r0)
        if rows_dst is not None:
            t0 = r0 // _P
            buf = rows_dst[:, t0:t0 + (rows + _P - 1) // _P, :]
        else:
            buf = stages[(r0 // (_CHUNK_TILES * _P)) % len(stages)]
        _load_rows(buf, src, r0, rows)
        _transpose_rows(dst_t, r0, buf, rows, t_ps[(r0 // (_CHUNK_TILES * _P)) % 2])


# --------------------------------------------------------------------------- forward

def _fwd_max_jobs(cb, qh, r0, n_rows, S, causal, k_t, s1_ps, tl_ps, ring):
    """Pass 1 of one query chunk as a list of closures (emitted one per pass-2 step of the previous chunk): load
    q and make q^T; per (query tile, 512-key block) the scores and their row max (VectorE from PSUM; the
    diagonal sub-block masked by select first); then m = max over the blocks and the row -bf16(m) of the chunk's
    queries (TensorE transposes of the [rows, 1] columns) for pass 2's rank-1 update."""
    tiles = _tiles(n_rows)

    jobs = [lambda: _load_rows(cb["q_rows"], qh, r0, n_rows), lambda: None, lambda: None,   # DMA fixed cost
            lambda: _transpose_rows(cb["q_t"], 0, cb["q_rows"], n_rows, tl_ps, scalar_copy=True)]
    n_blk = []
    for i, (i0, rows) in enumerate(tiles):
        kv_end = r0 + i0 + rows if causal else S
        blocks = list(range(0, kv_end, _MM_N))
        n_blk.append(len(blocks))
        for bj, j0 in enumerate(blocks):
            ring[0] += 1             # PSUM/SBUF score buffers in turn across tiles and chunks
            def block(i=i, i0=i0, rows=rows, kv_end=kv_end, bj=bj, j0=j0, x=ring[0] % s1_ps.shape[1]):
                w = min(_MM_N, kv_end - j0)
                nisa.nc_matmul(dst=s1_ps[0:rows, x, 0:w], stationary=cb["q_t"][:, i0:i0 + rows],
                               moving=k_t[:, j0:j0 + w], accumulate=False, name="scores")
                d0 = r0 + i0 - j0
                is_diag = causal and j0 + w == kv_end
                # ScalarE copy to SBUF in the input dtype (faster on the shared PSUM port than a VectorE read),
                # select -1e30 above the diagonal there, VectorE max of the copy (bf16: N/2 cycles). The max of
                # the rounded scores is the rounded max (rounding is monotonic), and pass 2 shifts by m rounded
                # to the input dtype anyway: the same m' as the fp32 path.
                s_sb = cb["s1_sb"][0:rows, x, 0:w]
                nisa.activation(dst=s_sb, op=nl.copy, data=s1_ps[0:rows, x, 0:w], name="s1_copy")
                if is_diag:
                    nisa.affine_select(dst=cb["s1_sb"][0:rows, x, d0:d0 + rows], pattern=[[-1, rows]],
                                       channel_multiplier=1, on_true_tile=cb["s1_sb"][0:rows, x, d0:d0 + rows],
                                       on_false_value=_MASKED, cmp_op=nl.greater_equal, offset=0, name="causal_mask")
                nisa.tensor_reduce(dst=cb["bmax"][0:rows, i, bj:bj + 1], op=nl.maximum, data=s_sb, axis=1)
            jobs.append(block)

    def finish():
        for i, (i0, rows) in enumerate(tiles):
            nisa.tensor_reduce(dst=cb["m"][0:rows, i:i + 1], op=nl.maximum, data=cb["bmax"][0:rows, i, 0:n_blk[i]],
                               axis=1)
        for rows, t0, t1 in _tile_groups(n_rows):
            nisa.tensor_scalar(dst=cb["negm"][0:rows, t0:t1], data=cb["m"][0:rows, t0:t1], op0=nl.multiply,
                               operand0=-1.0)

    def negm_row():            # [rows, 1] columns -> one [1, n_rows] row by SBUF -> SBUF DMAs (no engine time)
        for i, (i0, rows) in enumerate(tiles):
            nisa.dma_copy(dst=cb["negm_row"][0:1, i0:i0 + rows], src=cb["negm"][0:rows, i:i + 1])
    return jobs + [finish, lambda: None, negm_row]


@nki.jit
def flash_fwd(q, k, v, causal=True, softmax_scale=1.0):
    """q [B, Hq, S, D], k/v [B, Hkv, S, D] (bf16|fp32) -> (o [B, Hq, S, D] q.dtype, lse [B, Hq, S] fp32).

    Loops: one flat list of 512-row query chunks over batch -> kv head (K^T and V loaded once, kept in SBUF)
    -> its query heads -> chunks (causal: a head's longest chunk first), one DMA in, one out per chunk. Two
    passes per chunk, the exact row max first (no online rescaling):
      pass 1 (per 128-row query tile, 512-key blocks): scores s = q.k in PSUM, m = row max (VectorE).
      pass 2 (per 128-key tile, all the chunk's queries at once: moving free size 512): the transposed scores
             s^T [k, q] = k^T.T @ q^T plus the rank-1 update ones^T @ (-m') (m' = m rounded to the input dtype,
             the row shift, exact in fp32 PSUM up to the sum's rounding), p^T = exp(c*s^T) straight from PSUM
             (ScalarE) already in P @ V's stationary layout (no transposes of p), then o_aug[q, 0:D+1] +=
             p^T.T @ [v | 1]: the ones column of V gives l = rowsum(p) in the same fp32 PSUM sum.
    Pass 1 of chunk n+2 (and, at a kv head's first chunk, that head's K/V loads and K^T transposes) is emitted
    piece by piece, evenly spread over the pass-2 steps of chunk n, and pass 2 runs P @ V two key tiles behind
    the scores, so each engine's in-order queue has independent work (no drain at chunk or head boundaries).
    SBUF per partition (S = 4096, D = 128, bf16): three K^T + [v | 1] sets 3 x 16.1 KiB, K rows staging 8 KiB,
    three sets of chunk tiles (x2 for fp32). PSUM: pass-1 scores 3 banks (fp32: 2), s^T 2 banks, o_aug 2 banks,
    transposes 1 bank (fp32: 2) = 8 of 8.
    """
    B, Hq, Hkv, G, S, D, T, CH = _dims(q, k)
    dt, f32, c = q.dtype, nl.float32, float(softmax_scale)
    o = nl.ndarray((B, Hq, S, D), dtype=dt, buffer=nl.shared_hbm)
    lse = nl.ndarray((B, Hq, S), dtype=f32, buffer=nl.shared_hbm)
    NB = (S + _MM_N - 1) // _MM_N

    n_s1 = _FWD_S1_BUFS if dt != f32 else 2    # fp32: the two transpose groups take two banks
    s1_ps = nl.ndarray((_P, n_s1, _MM_N), dtype=f32, buffer=nl.psum)
    st_ps = nl.ndarray((_P, 2, _MM_N), dtype=f32, buffer=nl.psum)
    o_ps = [nl.ndarray((_P, 2, D + 1), dtype=f32, buffer=nl.psum) for _ in range(2)]
    t_all = nl.ndarray((_P, 2, _MM_N), dtype=dt, buffer=nl.psum)      # two transpose groups in one bank
    t_ps = [t_all[:, 0, :], t_all[:, 1, :]]
    # K^T / [V | 1] sets in turn: the next kv head's loads and transposes run during this head's last chunks
    kv_bufs = []
    for _ in range(_FWD_P1_LAG + 1):
        kvb = dict(k_t=nl.ndarray((D, S), dtype=dt, buffer=nl.sbuf),
                   v_aug=nl.ndarray((_P, T, D + 1), dtype=dt, buffer=nl.sbuf))
        nisa.memset(dst=kvb["v_aug"][:, :, D:D + 1], value=1.0)
        kv_bufs.append(kvb)
    k_rows = nl.ndarray((_P, T, D), dtype=dt, buffer=nl.sbuf)
    ones_row = nl.ndarray((1, _P), dtype=dt, buffer=nl.sbuf)
    nisa.memset(dst=ones_row, value=1.0)
    chunk_bufs = [dict(q_rows=nl.ndarray((_P, _CHUNK_TILES, D), dtype=dt, buffer=nl.sbuf),
                       q_t=nl.ndarray((D, CH), dtype=dt, buffer=nl.sbuf),
                       bmax=nl.ndarray((_P, _CHUNK_TILES, NB), dtype=dt, buffer=nl.sbuf),
                       s1_sb=nl.ndarray((_P, n_s1, _MM_N), dtype=dt, buffer=nl.sbuf),
                       m=nl.ndarray((_P, _CHUNK_TILES), dtype=f32, buffer=nl.sbuf),
                       negm=nl.ndarray((_P, _CHUNK_TILES), dtype=dt, buffer=nl.sbuf),
                       negm_row=nl.ndarray((1, CH), dtype=dt, buffer=nl.sbuf),
                       recip=nl.ndarray((_P, _CHUNK_TILES), dtype=f32, buffer=nl.sbuf),
                       log_l=nl.ndarray((_P, _CHUNK_TILES), dtype=f32, buffer=nl.sbuf),
                       o_sb=nl.ndarray((_P, _CHUNK_TILES, D), dtype=dt, buffer=nl.sbuf),
                       acc_sb=nl.ndarray((_P, _CHUNK_TILES, D + 1), dtype=f32, buffer=nl.sbuf),
                       lse_sb=nl.ndarray((_P, _CHUNK_TILES), dtype=f32, buffer=nl.sbuf))
                  for _ in range(_FWD_P1_LAG + 1)]
    p_t = nl.ndarray((_P, _FWD_PV_LAG + 1, CH), dtype=dt, buffer=nl.sbuf)

    heads = [(b_, g_) for b_ in range(B) for g_ in range(Hkv)]
    # causal: a head's longest query chunk first, so that the short chunks' pass 1 rides on longer pass 2s
    order = list(range(0, S, CH))[::-1] if causal else list(range(0, S, CH))
    chunks = [(hi, h, r0, min(CH, S - r0)) for hi, (b_, g_) in enumerate(heads)
              for h in range(g_ * G, (g_ + 1) * G) for r0 in order]
    nsets, ring = _FWD_P1_LAG + 1, [0]

    def kv_jobs(hi):
        b_, g_ = heads[hi]
        return _fwd_kv_jobs(kv_bufs[hi % nsets], k_rows, k[b_, g_], v[b_, g_], S, D, t_ps)

    def jobs_of(n):                 # pass 1 of chunk n, preceded by its kv head's loads at a head's first chunk
        hi, h, r0, n_rows = chunks[n]
        kv = kv_jobs(hi) if n == 0 or chunks[n - 1][0] != hi else []
        return kv + _fwd_max_jobs(chunk_bufs[n % nsets], q[heads[hi][0], h], r0, n_rows, S, causal,
                                  kv_bufs[hi % nsets]["k_t"], s1_ps, t_ps[n % 2], ring)
    for n in range(min(_FWD_P1_LAG, len(chunks))):
        for job in jobs_of(n):
            job()
    for n, (hi, h, r0, n_rows) in enumerate(chunks):
        side = jobs_of(n + _FWD_P1_LAG) if n + _FWD_P1_LAG < len(chunks) else []
        kvb, cb = kv_bufs[hi % nsets], chunk_bufs[n % nsets]
        _fwd_pass2(cb, r0, n_rows, S, D, causal, c, kvb["k_t"], kvb["v_aug"], ones_row, st_ps, o_ps, p_t, side)
        _store_rows(o[heads[hi][0], h], cb["o_sb"], r0, n_rows)
        _store_cols(lse[heads[hi][0], h], cb["lse_sb"], r0, n_rows)
    return o, lse


def _fwd_kv_jobs(kvb, k_rows, kh, vh, S, D, t_ps):
    """Loading one kv head as closures: the K rows and V (into [V | 1]) by one DMA each, then K^T by TensorE
    transposes, 512 rows per job (the k_rows staging tile is shared by the two K/V sets: the next head's K rows
    land only after this head's transposes, which read them, are done)."""
    def loads():
        _load_rows(k_rows, kh, 0, S)
        _load_rows(kvb["v_aug"][:, :, 0:D], vh, 0, S)
    jobs = [loads] + [lambda: None] * 2
    for gi, r0 in enumerate(range(0, S, _CHUNK_TILES * _P)):
        rows, t0 = min(_CHUNK_TILES * _P, S - r0), r0 // _P
        jobs.append(lambda r0=r0, rows=rows, t0=t0, gi=gi: _transpose_rows(
            kvb["k_t"], r0, k_rows[:, t0:t0 + (rows + _P - 1) // _P, :], rows, t_ps[gi % 2], scalar_copy=True))
    return jobs


def _fwd_pass2(cb, r0, n_rows, S, D, causal, c, k_t, v_aug, ones_row, st_ps, o_ps, p_t, side_jobs):
    """Pass 2 of one query chunk (see flash_fwd), P @ V one key tile behind the scores, one side job (the next
    chunk's pass 1) per step; then o = o_aug[:, :D] / l (one rounding), lse = log(l) + c*m'."""
    tiles = _tiles(n_rows)
    steps = []
    for k0 in range(0, r0 + n_rows if causal else S, _P):
        j = max(0, (k0 - r0) // _P) if causal else 0          # first query tile that sees key tile k0
        steps.append((k0, min(_P, S - k0), j))
    started = set()
    side_jobs = list(side_jobs)
    n_side, span = len(side_jobs), max(1, len(steps) - 2)       # spread evenly, done two steps before the end
    nbuf = _FWD_PV_LAG + 1

    def scores(t):
        k0, kw, j = steps[t]
        x, qa = t % 2, tiles[j][0]
        xp = t % nbuf
        qn = n_rows - qa
        nisa.nc_matmul(dst=st_ps[0:kw, x, 0:qn], stationary=k_t[:, k0:k0 + kw], moving=cb["q_t"][:, qa:n_rows],
                       accumulate=False, name="scores_t")
        nisa.nc_matmul(dst=st_ps[0:kw, x, 0:qn], stationary=ones_row[0:1, 0:kw],
                       moving=cb["negm_row"][0:1, qa:n_rows], accumulate=True, name="minus_max")
        nisa.activation(dst=p_t[0:kw, xp, 0:qn], op=nl.exp, data=st_ps[0:kw, x, 0:qn], scale=c, name="exp")
        if causal and k0 >= r0:      # key tile k0 is query tile j's diagonal: key p vs query f, keep f >= p
            rows = tiles[j][1]
            nisa.affine_select(dst=p_t[0:kw, xp, 0:rows], pattern=[[1, rows]], channel_multiplier=-1,
                               on_true_tile=p_t[0:kw, xp, 0:rows], on_false_value=0.0, cmp_op=nl.greater_equal,
                               offset=0, name="causal_mask_p")

    def pv(t):
        k0, kw, j = steps[t]
        x, qa = t % nbuf, tiles[j][0]
        for i in range(j, len(tiles)):
            i0, rows = tiles[i]
            nisa.nc_matmul(dst=o_ps[i // 2][0:rows, i % 2, :], stationary=p_t[0:kw, x, i0 - qa:i0 - qa + rows],
                           moving=v_aug[0:kw, k0 // _P, :], accumulate=i in started, name="pv")
            started.add(i)

    for t in range(len(steps) + _FWD_PV_LAG):
        if t < len(steps):
            scores(t)
        if 0 <= t - _FWD_PV_LAG < len(steps):
            pv(t - _FWD_PV_LAG)
        while side_jobs and n_side - len(side_jobs) < (t + 1) * n_side / span:
            side_jobs.pop(0)()
    for job in side_jobs:
        job()
    # o_aug leaves PSUM in one ScalarE copy per bank of whole tiles (the Vector/Scalar PSUM port is the
    # forward's tightest resource); 1/l, o = acc/l, log(l) and lse then read the fp32 SBUF copy
    acc = cb["acc_sb"]
    for j in range((len(tiles) + 1) // 2):
        pair = tiles[2 * j:2 * j + 2]
        if all(rows == _P for _, rows in pair):
            nisa.activation(dst=acc[:, 2 * j:2 * j + len(pair), :], op=nl.copy, data=o_ps[j][:, 0:len(pair), :])
        else:
            for x, (_, rows) in enumerate(pair):
                nisa.activation(dst=acc[0:rows, 2 * j + x, :], op=nl.copy, data=o_ps[j][0:rows, x, :])
    for rows, t0, t1 in _tile_groups(n_rows):
        nisa.reciprocal(dst=cb["recip"][0:rows, t0:t1], data=acc[0:rows, t0:t1, D])
        nisa.activation(dst=cb["log_l"][0:rows, t0:t1], op=nl.log, data=acc[0:rows, t0:t1, D])
        # lse = c*m' + log(l), m' = -negm (the shift pass 2 used)
        nisa.scalar_tensor_tensor(dst=cb["lse_sb"][0:rows, t0:t1], data=cb["negm"][0:rows, t0:t1],
                                  op0=nl.multiply, operand0=-c, op1=nl.add, operand1=cb["log_l"][0:rows, t0:t1])
    for i, (i0, rows) in enumerate(tiles):
        nisa.tensor_scalar(dst=cb["o_sb"][0:rows, i, :], data=acc[0:rows, i, 0:D], op0=nl.multiply,
                           operand0=cb["recip"][0:rows, i:i + 1])


# --------------------------------------------------------------------------- backward

def _tile_groups(n_rows):
    """[(rows, t0, t1)]: the whole 128-row tiles of n_rows as one group (tiles t0..t1, 128 rows each) and a
    partial tail tile as another (instructions over several tiles must not read a tail tile's unset rows)."""
    full, tail = divmod(n_rows, _P)
    return ([(_P, 0, full)] if full else []) + ([(tail, full, full + 1)] if tail else [])


def _bwd_kv_jobs(kvb, kh, vh, S, stage, tl_ps):
    """Loading one kv head as a list of closures (see _bwd_chunk_jobs): per 512 rows
    the DMAs of K (kept as rows) and V (staged), then the K^T and V^T transposes. (The sums need no zeroing:
    the first flush of each key block copies; every key block is flushed by some chunk of the head.)"""
    wait = [lambda: None] * 2
    jobs = [kvb["touched"].clear]      # key blocks whose fp32 dK/dV sums hold this head's values
    for gi, r0 in enumerate(range(0, S, _CHUNK_TILES * _P)):
        rows, t0 = min(_CHUNK_TILES * _P, S - r0), r0 // _P
        k_buf = kvb["k_rows"][:, t0:t0 + (rows + _P - 1) // _P, :]
        v_buf = stage[gi % len(stage)]
        jobs += [lambda r0=r0, rows=rows, k_buf=k_buf, v_buf=v_buf: (_load_rows(k_buf, kh, r0, rows),
                                                                     _load_rows(v_buf, vh, r0, rows))] + wait
        jobs += [lambda r0=r0, rows=rows, k_buf=k_buf: _transpose_rows(kvb["k_t"], r0, k_buf, rows, tl_ps)] + wait
        jobs += [lambda r0=r0, rows=rows, v_buf=v_buf: _transpose_rows(kvb["v_t"], r0, v_buf, rows, tl_ps)]
    return jobs


def _bwd_chunk_jobs(cb, srcs, r0, n_rows, tl_ps):
    """The input work of one query chunk as a list of closures, so that the next chunk's work can be emitted
    one piece per pipeline step of the current chunk (each engine's queue then interleaves it with the units
    instead of stalling at the chunk boundary): loads of q, do, o, lse; q^T, do^T by TensorE transposes, 512
    rows per job; then _bwd_chunk_prep. srcs = (q, do, o, lse) HBM views of the head."""
    qh, doh, oh, lseh = srcs

    def loads():
        _load_rows(cb["q_rows"], qh, r0, n_rows)
        _load_rows(cb["do_rows"], doh, r0, n_rows)
        _load_rows(cb["o_rows"], oh, r0, n_rows)
        _load_cols(cb["lse"], lseh, r0, n_rows)
    wait = [lambda: None] * 2        # steps between a job and the next one that uses its results
    jobs = [loads] + wait
    for g0 in range(0, n_rows, _CHUNK_TILES * _P):
        g_rows, t0 = min(_CHUNK_TILES * _P, n_rows - g0), g0 // _P
        for name, rows_t in (("q_t", "q_rows"), ("do_t", "do_rows")):
            jobs += [lambda name=name, rows_t=rows_t, g0=g0, g_rows=g_rows, t0=t0: _transpose_rows(
                cb[name], g0, cb[rows_t][:, t0:t0 + _CHUNK_TILES, :], g_rows, tl_ps)] + wait
    return jobs + [lambda: _bwd_chunk_prep(cb, n_rows)]


def _bwd_chunk_prep(cb, n_rows):
    """Per query chunk, the two per-row biases of ScalarE: neg_lse = -lse (of p = exp(c*s - lse)) and
    negd = -Dlt = -rowsum(do * o) in fp32 (of dp - Dlt)."""
    for rows, t0, t1 in _tile_groups(n_rows):
        nisa.tensor_tensor(dst=cb["prod"][0:rows, t0:t1, :], data1=cb["do_rows"][0:rows, t0:t1, :],
                           data2=cb["o_rows"][0:rows, t0:t1, :], op=nl.multiply)
        nisa.tensor_reduce(dst=cb["negd"][0:rows, t0:t1], op=nl.add, data=cb["prod"][0:rows, t0:t1, :], axis=2,
                           negate=True)
        nisa.tensor_scalar(dst=cb["neg_lse"][0:rows, t0:t1], data=cb["lse"][0:rows, t0:t1], op0=nl.multiply,
                           operand0=-1.0)


@nki.jit
def flash_bwd(q, k, v, o, do, lse, causal=True, softmax_scale=1.0):
    """Gradients of flash_fwd: (dq [B,Hq,S,D] q.dtype, dk, dv [B,Hkv,S,D] k.dtype); lse is flash_fwd's fp32 lse.

    Loops: batch -> kv head (K rows, K^T, V^T loaded once; fp32 dK/dV accumulators in SBUF) -> its query heads
    -> 1024-row query chunks (q, o, do, lse in by one DMA each per 512 rows, chunk buffers double-buffered;
    dq out) -> units of (256-key block, 128-row query tile) (causal: up to the tile's last key). The units run
    as a three-stage software pipeline in program order (A: scores, dP, exp, dS; B: dV/dK matmuls and the dS
    transposes; C: dQ matmuls, two units behind A), with every PSUM/SBUF tile between the stages
    double-buffered, so that each engine's in-order queue has independent work while it waits for the others.
    dK/dV of a block accumulate in PSUM (double-buffered by block parity) over the chunk's query tiles and are
    added to the SBUF accumulators once per (chunk, block); dq of the chunk's eight tiles accumulates in PSUM.
    SBUF per partition (S = 4096, D = 128, bf16): k rows, k^T, v^T 24 KiB + fp32 dK, dV 32 KiB + two sets of
    chunk tiles ~30 KiB (the interpreter measures the peak). PSUM: scores, dP (2 buffers each in one bank),
    dV, dK (2 block buffers each in one bank), dQ 2 banks, dS^T 1 bank, load transposes 1 bank = 8 of 8.
    """
    B, Hq, Hkv, G, S, D, T, _ = _dims(q, k)
    dt, f32, c = q.dtype, nl.float32, float(softmax_scale)
    CT = _BWD_CHUNK_TILES
    CH, BLK, NSUB = CT * _P, _BWD_BLOCK, _BWD_BLOCK // _P
    dq = nl.ndarray((B, Hq, S, D), dtype=dt, buffer=nl.shared_hbm)
    dk = nl.ndarray((B, Hkv, S, D), dtype=dt, buffer=nl.shared_hbm)
    dv = nl.ndarray((B, Hkv, S, D), dtype=dt, buffer=nl.shared_hbm)

    s_ps = nl.ndarray((_P, 2, BLK), dtype=f32, buffer=nl.psum)
    dp_ps = nl.ndarray((_P, 2, BLK), dtype=f32, buffer=nl.psum)
    dv_ps = nl.ndarray((_P, 2, NSUB, D), dtype=f32, buffer=nl.psum)
    dk_ps = nl.ndarray((_P, 2, NSUB, D), dtype=f32, buffer=nl.psum)
    dq_ps = nl.ndarray((_P, CT, D), dtype=f32, buffer=nl.psum)
    t_ps = nl.ndarray((_P, 2 * NSUB * _P), dtype=dt, buffer=nl.psum)   # dS^T of two units / load transposes
    tl_ps = nl.ndarray((_P, _CHUNK_TILES * _P), dtype=dt, buffer=nl.psum)

    # K rows, K^T, V^T and the fp32 dK/dV sums of a kv head; two sets (the next head's loads overlap this head's
    # compute) where SBUF holds them: bf16 up to S = 4096 (2 x 56 KiB per partition at S = 4096, D = 128)
    kv_sets = 2 if dt != f32 and S <= _BWD_KV_DOUBLE_MAX_SEQ else 1
    kv_bufs = [dict(k_rows=nl.ndarray((_P, T, D), dtype=dt, buffer=nl.sbuf),
                    k_t=nl.ndarray((D, S), dtype=dt, buffer=nl.sbuf),
                    v_t=nl.ndarray((D, S), dtype=dt, buffer=nl.sbuf),
                    dk_acc=nl.ndarray((_P, T, D), dtype=f32, buffer=nl.sbuf),
                    dv_acc=nl.ndarray((_P, T, D), dtype=f32, buffer=nl.sbuf), touched=set()) for _ in range(kv_sets)]
    stage = [nl.ndarray((_P, _CHUNK_TILES, D), dtype=dt, buffer=nl.sbuf) for _ in range(2)]
    chunk_bufs = [dict(q_rows=nl.ndarray((_P, CT, D), dtype=dt, buffer=nl.sbuf),
                       do_rows=nl.ndarray((_P, CT, D), dtype=dt, buffer=nl.sbuf),
                       o_rows=nl.ndarray((_P, CT, D), dtype=dt, buffer=nl.sbuf),
                       q_t=nl.ndarray((D, CH), dtype=dt, buffer=nl.sbuf),
                       do_t=nl.ndarray((D, CH), dtype=dt, buffer=nl.sbuf),
                       prod=nl.ndarray((_P, CT, D), dtype=f32, buffer=nl.sbuf),
                       negd=nl.ndarray((_P, CT), dtype=f32, buffer=nl.sbuf),
                       lse=nl.ndarray((_P, CT), dtype=f32, buffer=nl.sbuf),
                       neg_lse=nl.ndarray((_P, CT), dtype=f32, buffer=nl.sbuf),
                       dq_sb=nl.ndarray((_P, CT, D), dtype=dt, buffer=nl.sbuf)) for _ in range(2)]
    p_sb = nl.ndarray((_P, _BWD_LAG_B + 1, BLK), dtype=dt, buffer=nl.sbuf)
    ds_sb = nl.ndarray((_P, _BWD_LAG_B + 1, BLK), dtype=dt, buffer=nl.sbuf)
    dpm_sb = nl.ndarray((_P, 2, BLK), dtype=dt, buffer=nl.sbuf)
    ds_t = nl.ndarray((_P, 2, NSUB * _P), dtype=dt, buffer=nl.sbuf)
    out_sb = [nl.ndarray((_P, _CHUNK_TILES, D), dtype=dt, buffer=nl.sbuf) for _ in range(_BWD_OUT_BUFS)]
    n_blocks = 0

    heads = [(b_, g_) for b_ in range(B) for g_ in range(Hkv)]
    chunks = [(hi, h, r0, min(CH, S - r0)) for hi, (b_, g_) in enumerate(heads)
              for h in range(g_ * G, (g_ + 1) * G) for r0 in range(0, S, CH)]

    def kv_jobs(hi):
        b_, g_ = heads[hi]
        return _bwd_kv_jobs(kv_bufs[hi % kv_sets], k[b_, g_], v[b_, g_], S, stage, tl_ps)

    def out_jobs(hi):
        """dk = c * dK_acc, dv = dV_acc of kv head hi, one rounding each, 512 rows per store (ring of out_sb)."""
        b_, g_ = heads[hi]
        kvb, jobs = kv_bufs[hi % kv_sets], []
        for s0 in range(0, S, _CHUNK_TILES * _P):
            s_rows, t0 = min(_CHUNK_TILES * _P, S - s0), s0 // _P
            nt = (s_rows + _P - 1) // _P
            for acc_t, scale_by, dst in ((kvb["dk_acc"], c, dk), (kvb["dv_acc"], 1.0, dv)):
                def job(acc_t=acc_t, scale_by=scale_by, dst=dst, s0=s0, s_rows=s_rows, t0=t0, nt=nt,
                        buf=out_sb[len(jobs) % _BWD_OUT_BUFS]):
                    nisa.activation(dst=buf[:, 0:nt, :], op=nl.copy, data=acc_t[:, t0:t0 + nt, :], scale=scale_by)
                    _store_rows(dst[b_, g_], buf, s0, s_rows)
                jobs.append(job)
        return jobs

    def jobs_of(n):
        hi, h, r0, n_rows = chunks[n]
        b_ = heads[hi][0]
        return _bwd_chunk_jobs(chunk_bufs[n % 2], (q[b_, h], do[b_, h], o[b_, h], lse[b_, h]), r0, n_rows, tl_ps)
    for job in kv_jobs(0) + jobs_of(0):
        job()
    pending = []
    for n, (hi, h, r0, n_rows) in enumerate(chunks):
        b, g = heads[hi]
        kvb, cb = kv_bufs[hi % kv_sets], chunk_bufs[n % 2]
        head_ends = n + 1 == len(chunks) or chunks[n + 1][0] != hi
        tiles = _tiles(n_rows)
        units = []                 # (block index, j0, w, tile i, i0, rows, q0, last unit of block)
        for j0 in range(0, r0 + n_rows if causal else S, BLK):
            blk = []
            for i, (i0, rows) in enumerate(tiles):
                kv_end = r0 + i0 + rows if causal else S
                if j0 < kv_end:        # else the block is entirely above the diagonal: skipped
                    blk.append([n_blocks, j0, min(BLK, kv_end - j0), i, i0, rows, r0 + i0, False])
            blk[-1][-1] = True
            units += blk
            n_blocks += 1
        side, pending = pending, []
        if n + 1 < len(chunks):
            if head_ends and kv_sets == 2:      # the next kv head's K/V land in the other set meanwhile
                side = side + kv_jobs(hi + 1)
            side = side + jobs_of(n + 1)
        _bwd_pipeline(units, cb, S, causal, c, kvb["k_t"], kvb["v_t"], kvb["k_rows"], kvb["dk_acc"], kvb["dv_acc"],
                      kvb["touched"], s_ps, dp_ps, dv_ps, dk_ps, dq_ps, t_ps, p_sb, ds_sb, dpm_sb, ds_t, side)
        # dq = c * sum_blocks ds @ k, one rounding to dt
        for rows, t0, t1 in _tile_groups(n_rows):
            nisa.activation(dst=cb["dq_sb"][0:rows, t0:t1, :], op=nl.copy, data=dq_ps[0:rows, t0:t1, :], scale=c)
        _store_rows(dq[b, h], cb["dq_sb"], r0, n_rows)
        if not head_ends:
            continue
        if kv_sets == 2 and n + 1 < len(chunks):
            pending = out_jobs(hi)        # emitted in the next head's first chunk: its sums are in the other set
            continue
        for job in out_jobs(hi):
            job()
        if n + 1 < len(chunks):
            for job in kv_jobs(hi + 1):   # one K/V set: the next head's loads wait for this head's last reads
                job()
    return dq, dk, dv


def _bwd_pipeline(units, cb, S, causal, c, k_t, v_t, k_rows, dk_acc, dv_acc, touched,
                  s_ps, dp_ps, dv_ps, dk_ps, dq_ps, t_ps, p_sb, ds_sb, dpm_sb, ds_t, side_jobs):
    """The units of one query chunk, stage A of unit u emitted with stage B of u-1 and stage C of u-2 (buffers
    by unit parity; dK/dV PSUM by block parity, flushed to the SBUF accumulators after a block's last unit);
    side_jobs (the next chunk's input work) one per step from the third step on, the rest at the end."""
    dq_started = set()
    kv_started = {}

    def stage_a(u, unit):
        bi, j0, w, i, i0, rows, q0, _ = unit
        x, xp = u % 2, u % (_BWD_LAG_B + 1)
        nisa.nc_matmul(dst=s_ps[0:rows, x, 0:w], stationary=cb["q_t"][:, i0:i0 + rows], moving=k_t[:, j0:j0 + w],
                       accumulate=False, name="scores")
        nisa.nc_matmul(dst=dp_ps[0:rows, x, 0:w], stationary=cb["do_t"][:, i0:i0 + rows],
                       moving=v_t[:, j0:j0 + w], accumulate=False, name="dp")
        # p = exp(c*s - lse), fp32 on ScalarE, rounded to dt
        nisa.activation(dst=p_sb[0:rows, xp, 0:w], op=nl.exp, data=s_ps[0:rows, x, 0:w],
                        bias=cb["neg_lse"][0:rows, i:i + 1], scale=c)
        if causal and j0 + w == q0 + rows:
            d0 = q0 - j0         # keys j0+d0+f against queries q0+p: p becomes exactly 0 where f > p (select)
            nisa.affine_select(dst=p_sb[0:rows, xp, d0:d0 + rows], pattern=[[-1, rows]], channel_multiplier=1,
                               on_true_tile=p_sb[0:rows, xp, d0:d0 + rows], on_false_value=0.0,
                               cmp_op=nl.greater_equal, offset=0, name="causal_mask")
        # dp - Dlt in fp32 by the ScalarE eviction's per-row bias (a rank update of PSUM would cost TensorE a
        # full matmul: its cycles follow the moving free size), then ds = p * (dp - Dlt) on VectorE from SBUF,
        # rounded to dt
        nisa.activation(dst=dpm_sb[0:rows, x, 0:w], op=nl.copy, data=dp_ps[0:rows, x, 0:w],
                        bias=cb["negd"][0:rows, i:i + 1])
        nisa.tensor_tensor(dst=ds_sb[0:rows, xp, 0:w], data1=dpm_sb[0:rows, x, 0:w], data2=p_sb[0:rows, xp, 0:w],
                           op=nl.multiply, name="ds")

    def stage_b(u, unit):
        bi, j0, w, i, i0, rows, q0, last = unit
        x, pb, xp = u % 2, bi % 2, u % (_BWD_LAG_B + 1)
        tx = x * _BWD_BLOCK
        subs = _tiles(w)
        for jj, (k0, kw) in enumerate(subs):
            acc = (bi, jj) in kv_started
            kv_started[(bi, jj)] = True
            nisa.nc_matmul(dst=dv_ps[0:kw, pb, jj, :], stationary=p_sb[0:rows, xp, k0:k0 + kw],
                           moving=cb["do_rows"][0:rows, i, :], accumulate=acc, name="dv")
            nisa.nc_matmul(dst=dk_ps[0:kw, pb, jj, :], stationary=ds_sb[0:rows, xp, k0:k0 + kw],
                           moving=cb["q_rows"][0:rows, i, :], accumulate=acc, name="dk")
        for jj, (k0, kw) in enumerate(subs):
            nisa.nc_transpose(dst=t_ps[0:kw, tx + jj * rows:tx + (jj + 1) * rows], data=ds_sb[0:rows, xp, k0:k0 + kw])
        n_full = sum(1 for _, kw in subs if kw == _P)
        if n_full:
            nisa.activation(dst=ds_t[:, x, 0:n_full * rows], op=nl.copy, data=t_ps[:, tx:tx + n_full * rows])
        if n_full < len(subs):
            kw = subs[-1][1]
            nisa.activation(dst=ds_t[0:kw, x, n_full * rows:(n_full + 1) * rows], op=nl.copy,
                            data=t_ps[0:kw, tx + n_full * rows:tx + (n_full + 1) * rows])
        if last:                      # dK/dV of this block into the fp32 SBUF accumulators
            t0 = j0 // _P
            first = j0 not in touched          # the head's first sum of this block: a copy, no memset
            touched.add(j0)
            for rows_k, s0, s1 in _tile_groups(min(S - j0, _BWD_BLOCK)):
                for acc_t, ps in ((dv_acc, dv_ps), (dk_acc, dk_ps)):
                    if first:
                        nisa.tensor_copy(dst=acc_t[0:rows_k, t0 + s0:t0 + s1, :], src=ps[0:rows_k, pb, s0:s1, :],
                                         name="dkv_flush")
                    else:
                        nisa.tensor_tensor(dst=acc_t[0:rows_k, t0 + s0:t0 + s1, :],
                                           data1=acc_t[0:rows_k, t0 + s0:t0 + s1, :],
                                           data2=ps[0:rows_k, pb, s0:s1, :], op=nl.add, name="dkv_flush")

    def stage_c(u, unit):
        bi, j0, w, i, i0, rows, q0, _ = unit
        x = u % 2
        for jj, (k0, kw) in enumerate(_tiles(w)):
            nisa.nc_matmul(dst=dq_ps[0:rows, i, :], stationary=ds_t[0:kw, x, jj * rows:(jj + 1) * rows],
                           moving=k_rows[0:kw, (j0 + k0) // _P, :], accumulate=i in dq_started)
            dq_started.add(i)

    n = len(units)
    side_jobs = list(side_jobs)
    start = max(2, n // 3)        # the next chunk's loads (WAR on the chunk before this one) have landed by then
    for t in range(n + _BWD_LAG_C):
        if t < n:
            stage_a(t, units[t])
        if 0 <= t - _BWD_LAG_B < n:
            stage_b(t - _BWD_LAG_B, units[t - _BWD_LAG_B])
        if 0 <= t - _BWD_LAG_C < n:
            stage_c(t - _BWD_LAG_C, units[t - _BWD_LAG_C])
        if t >= start and side_jobs:
            side_jobs.pop(0)()
    for job in side_jobs:
        job()


# --------------------------------------------------------------------------- torch-level launchers

_DTYPES = ("torch.bfloat16", "torch.float32")


def _fail(msg):
    raise ValueError(f"kernels/attention.py: {msg}")


def _check_qkv(q, k, v, softmax_scale):
    """Validate q/k/v; returns the softmax scale (1/sqrt(D) by default)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if str(t.dtype) not in _DTYPES:
            _fail(f"{name} has dtype {t.dtype}; supported dtypes are bfloat16 and float32")
        if t.dim() != 4:
            _fail(f"{name} must be 4-D [B, heads, S, D], got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(k.shape) != tuple(v.shape):
        _fail(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        _fail(f"k/v shape {tuple(k.shape)} must match q shape {tuple(q.shape)} in batch, sequence and head_dim "
              f"(self-attention, Sq == Sk)")
    if min(B, Hq, k.shape[1], S, D) < 1:
        _fail(f"empty input q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % k.shape[1]:
        _fail(f"query heads {Hq} (q {tuple(q.shape)}) must be a multiple of kv heads {k.shape[1]} "
              f"(k {tuple(k.shape)}) for GQA")
    if D > MAX_HEAD_DIM:
        _fail(f"head_dim {D} of q {tuple(q.shape)} exceeds {MAX_HEAD_DIM} (the partition dim of q^T/k^T: rule "
              f"matmul contraction <= 128)")
    limit = MAX_SEQ[str(q.dtype).replace("torch.", "")]
    if S > limit:
        _fail(f"sequence length {S} of q {tuple(q.shape)} exceeds {limit} for {q.dtype} (K/V of one kv head and "
              f"the fp32 dK/dV accumulators stay in SBUF: 176 KiB per partition on trn1)")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        _fail(f"softmax_scale {softmax_scale!r} must be a finite number > 0 (the running max is taken on the "
              f"unscaled scores)")
    return scale


def flash_attention_fwd(q, k, v, causal=True, softmax_scale=None):
    """-> (o [B, Hq, S, D] in q.dtype, lse [B, Hq, S] fp32), softmax(q k^T * scale [causal]) v with native GQA."""
    scale = _check_qkv(q, k, v, softmax_scale)
    return flash_fwd(q.contiguous(), k.contiguous(), v.contiguous(), causal=bool(causal), softmax_scale=scale)


def flash_attention_bwd(q, k, v, o, do, lse, causal=True, softmax_scale=None):
    """Gradients of flash_attention_fwd for the upstream gradient do: -> (dq, dk, dv) in the input dtype.

    o and lse are flash_attention_fwd's outputs for the same q, k, v, causal and softmax_scale; dk/dv are summed
    over the query heads of each kv head's group inside the kernel."""
    scale = _check_qkv(q, k, v, softmax_scale)
    for name, t in (("o", o), ("do", do)):
        if tuple(t.shape) != tuple(q.shape):
            _fail(f"{name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            _fail(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        _fail(f"lse shape {tuple(lse.shape)} must be [B, Hq, S] = {tuple(q.shape[:3])}")
    if str(lse.dtype) != "torch.float32":
        _fail(f"lse dtype {lse.dtype} must be float32 (the forward's fp32 log-sum-exp)")
    return flash_bwd(q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous(), do.contiguous(),
                     lse.contiguous(), causal=bool(causal), softmax_scale=scale)
