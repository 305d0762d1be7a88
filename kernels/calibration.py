"""Calibration kernels of the cost model (``kernels.sim.cost``; tests: ``tests/test_sim_cost.py``).

Three kernels whose time on NeuronCore-v2 is known from published figures, so that the model's estimate can be
checked against them:

* ``blocked_matmul_kernel(lhsT, rhs)``: bf16 C[M, N] = lhsT[K, M].T @ rhs[K, N], blocked like AWS's optimized
  matmul tutorial (M tiles of 128 on the stationary side, N tiles of 512 moving, K tiles of 128 on the
  partitions; a block of BLOCK_M = 4 x 128 columns of lhsT stays in SBUF for every 512-column block of rhs; each
  block is one DMA). Compute-bound: expected TensorE-bound near the tutorial's published
  85% of TensorE peak.
* ``copy_kernel(x)``: HBM -> SBUF -> HBM in [128, cols] tiles of >= 4 KiB per partition; DMA-bound near
  bytes / HBM bandwidth.
* ``dependent_chain_kernel(x, steps)``: ``steps`` ScalarE activations on one [128, 1] tile, each reading the
  previous one's output; latency-bound near the documented dependent-instruction time (189 ns each).
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

MM_TILE_K = 128          # contraction tile: the partition dim (nl.tile_size.pmax)
MM_TILE_M = 128          # stationary free size (<= 128)
MM_TILE_N = 512          # moving free size (<= 512 = one fp32 PSUM bank, nl.tile_size.psum_fmax)
MM_BLOCK_M_TILES = 4     # M tiles per lhsT block kept in SBUF


@nki.jit
def blocked_matmul_kernel(lhsT, rhs):
    """lhsT [K, M] bf16, rhs [K, N] bf16 (HBM); returns C [M, N] bf16 = lhsT.T @ rhs, fp32 PSUM accumulation.

    K % 128 == 0, M % 512 == 0, N % 512 == 0. SBUF per partition: lhsT block K/128 x 512 x 2 B plus rhs block
    K/128 x 512 x 2 B (16 KiB each at K = 2048), result tiles 1 KiB."""
    K, M = lhsT.shape
    K2, N = rhs.shape
    assert K == K2 and K % MM_TILE_K == 0 and N % MM_TILE_N == 0
    block_m = MM_TILE_M * MM_BLOCK_M_TILES
    assert M % block_m == 0
    kt = K // MM_TILE_K
    out = nl.ndarray((M, N), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    # Contraction row K index = p * kt + k on partition p, k tile k, for both operands: a block of either
    # operand is then one DMA with kt x cols contiguous elements per partition (16 KiB at K = 2048), and the sum
    # over the k tiles of the per-tile contractions over p covers every K row once.
    lhsT_v = lhsT.reshape((MM_TILE_K, kt, M))
    rhs_v = rhs.reshape((MM_TILE_K, kt, N))
    for m0 in range(0, M, block_m):
        a_blk = nl.ndarray((MM_TILE_K, kt, block_m), dtype=lhsT.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_blk, src=lhsT_v[:, :, m0:m0 + block_m])
        for n0 in range(0, N, MM_TILE_N):
            b_blk = nl.ndarray((MM_TILE_K, kt, MM_TILE_N), dtype=rhs.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=b_blk, src=rhs_v[:, :, n0:n0 + MM_TILE_N])
            for mt in range(MM_BLOCK_M_TILES):
                ps = nl.ndarray((MM_TILE_M, MM_TILE_N), dtype=nl.float32, buffer=nl.psum)
                for k in range(kt):
                    nisa.nc_matmul(dst=ps, stationary=a_blk[:, k, mt * MM_TILE_M:(mt + 1) * MM_TILE_M],
                                   moving=b_blk[:, k, :])
                res = nl.ndarray((MM_TILE_M, MM_TILE_N), dtype=lhsT.dtype, buffer=nl.sbuf)
                nisa.tensor_copy(dst=res, src=ps)
                r0 = m0 + mt * MM_TILE_M
                nisa.dma_copy(dst=out[r0:r0 + MM_TILE_M, n0:n0 + MM_TILE_N], src=res)
    return out


@nki.jit
def copy_kernel(x):
    """x [R, C] (HBM, R % 128 == 0) -> a copy through SBUF in [128, C] tiles (one load and one store each)."""
    R, C = x.shape
    assert R % 128 == 0
    out = nl.ndarray((R, C), dtype=x.dtype, buffer=nl.shared_hbm)
    for r0 in range(0, R, 128):
        t = nl.ndarray((128, C), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[r0:r0 + 128, :])
        nisa.dma_copy(dst=out[r0:r0 + 128, :], src=t)
    return out


@nki.jit
def dependent_chain_kernel(x, steps):
    """x [128, 1] fp32 (HBM) -> x after ``steps`` dependent ScalarE copies (activation op=copy), stored once."""
    t = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    for _ in range(steps):
        u = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=u, op=nl.copy, data=t)
        t = u
    out = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out
