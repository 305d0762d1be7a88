"""NeuronCore-v2 (trn1) constants of the cost model ``kernels.sim.cost``, each with its source.

Sources (AWS Neuron documentation; the figures are collected in /work/shared/docs/nki-spec.md section 3):

* [ARCH]  NKI architecture guide, "Trainium/Inferentia2 Architecture Guide for NKI",
          https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/arch/trainium_inferentia2_arch.html
* [NCV2]  "NeuronCore-v2 Architecture",
          https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/neuron-core-v2.html
* [ISA]   nki.isa API pages of the legacy releases (v2.26.1 docstrings: per-instruction cycle formulas, MIN_II,
          MM_INIT_LATENCY, GPSIMD_START, fixed overheads; dropped from the new pages), e.g.
          https://awsdocs-neuron.readthedocs-hosted.com/en/v2.26.1/general/nki/api/nki.isa.html
* [DMA]   "Introduction to Direct Memory Access (DMA) with NKI",
          https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/about/nki-dma-overview.html
* [DMAX]  Neuron Explorer, "How to identify and reduce inefficient DMA transfers",
          https://awsdocs-neuron.readthedocs-hosted.com/en/latest/tools/neuron-explorer/how-to-reduce-inefficient-dma-transfers.html
* [DMABW] "Guideline to Avoid Under-Utilizing DMA Bandwidth" (>= 4 KiB payloads),
          https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/deep-dives/nki-dma-bandwidth-guide.html
* [PERF]  "NKI Performance Guide" (90%+ engine active = good compute-bound, 60%+ MBU = good memory-bound),
          https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/nki_perf_guide.html
* [MMT]   NKI tutorial "Matrix multiplication" (trn1, [4096,8192] @ [8192,8192] bf16),
          https://awsdocs-neuron.readthedocs-hosted.com/en/v2.28.1/_sources/nki/guides/tutorials/matrix_multiplication.rst

Labels: [doc] a documented figure; [derived] arithmetic on documented figures (shown); [assumption] no published
figure, our choice (stated why).
"""

# ---------------------------------------------------------------------------------------------------- clocks
TENSOR_HZ = 2.8e9          # [doc] [ARCH] TensorE 2.8 GHz
VECTOR_HZ = 1.12e9         # [doc] [ARCH] VectorE 1.12 GHz (engine table)
SCALAR_HZ = 1.4e9          # [doc] [ARCH] ScalarE 1.4 GHz
GPSIMD_HZ = 1.4e9          # [doc] [ARCH] GpSimd 8 cores at 1.4 GHz
SYNC_HZ = 1.4e9            # [assumption] the Sync engine only sequences; costed like a tiny ScalarE instruction

# ----------------------------------------------------------------------------------------------- TensorE
PE_ROWS = 128              # [doc] [ARCH] 128x128 systolic array
PE_COLS = 128
MM_MOVING_FLOOR = 64       # [doc] [ISA] nc_matmul cycles max(min(64, N_stationary), N_moving): 64 = min stationary term
MM_INIT_LATENCY = 64       # [doc] [ISA] MM initiation interval max(N, MM_INIT_LATENCY=64): the 64-cycle floor
MM_FP32_FACTOR = 4         # [doc] [ISA] fp32 matmul runs 4 passes ("4x" the bf16 cycles)
# Peak: 128 x 128 MACs x 2 FLOP x 2.8 GHz = 91.75 TFLOPS bf16 per NeuronCore ([derived]; [ARCH] quotes ~92 / "over
# 90 TFLOPS" [NCV2]); fp32 a quarter of that.
TENSOR_PEAK_FLOPS = PE_ROWS * PE_COLS * 2 * TENSOR_HZ

# ------------------------------------------------------------------------------------ Vector/Scalar/GpSimd
MIN_II = 64                # [doc] [ISA] minimum initiation interval of an engine instruction (~64 cycles)
GPSIMD_START = 150         # [doc] [ISA] iota / affine_select: GPSIMD_START (~150) + N cycles
GPSIMD_RSQRT_FACTOR = 4    # [doc] [ISA] rsqrt on GpSimd ~4x slower than on ScalarE

# Dependent-instruction latency: cycles from the end of an instruction's issue until a dependent instruction on
# any engine may start (pipeline drain + semaphore). Independent instructions on one engine pipeline back to
# back and do not pay it.
#   scalar: [derived] [ISA] observed dependent back-to-back tiny ScalarE instructions 189 ns = 264 ScalarE
#           cycles each; minus the MIN_II of the instruction itself = 200 cycles.
#   vector: [doc] [ISA] "add ~100 VectorE cycles when ... each depends on the previous".
#   gpsimd: [assumption] the "static instruction overhead in the order of ~100 cycles" [ISA].
#   tensor: [assumption] MM_INIT_LATENCY (64 cycles) before a PSUM result is readable.
#   sync:   [assumption] as gpsimd.
DEP_LATENCY_CYCLES = {"scalar": 200, "vector": 100, "gpsimd": 100, "tensor": 64, "sync": 100}
OBSERVED_TINY_SCALAR_CHAIN_NS = 189.0   # [doc] [ISA] the observation the scalar latency is derived from

# ---------------------------------------------------------------------------------------------------- DMA
DMA_ENGINES = 16                 # [doc] [DMA] "Each NeuronCore (v2-v4) is paired with 16 DMA engines"
DMA_PARTITIONS_PER_ENGINE = 8    # [derived] [DMAX] one packet "per engine per group of SBUF partitions";
                                 # 128 partitions / 16 engines = 8 (nki-spec 3.2)
DMA_ENGINE_BW = 27.2e9           # [doc] [DMA] "theoretical bandwidth of 27.2 GB/s" per engine (NC-v2/-v3), B/s
# Fixed cost of a transfer, paid as latency from the moment its inputs are ready until its bytes start moving
# (descriptor generation + semaphore handshake): [doc] nki-spec 3.2 "~1300 ns cross-engine" from the legacy
# [ISA]/[ARCH] notes. It does not occupy the engines: transfers in flight overlap their fixed costs.
DMA_ISSUE_LATENCY_NS = 1300.0
# Per-packet engine occupancy before its bytes move ([DMAX]: "each packet pays a setup latency"):
# [derived] documented example "32 KiB on one engine = 1416 ns" minus 32768 B / 27.2 GB/s = 1204.7 ns -> 211.3 ns.
DMA_PACKET_SETUP_NS = 1416.0 - 32768 / 27.2
# HBM bandwidth per NeuronCore, shared by its 16 DMA engines: [derived] [ARCH] 820 GB/s per device with 2
# NeuronCores -> 410 GB/s per NeuronCore (nki-spec 3.1 roofline knee 222 FLOP/B = 92 TF / ~410 GB/s).
HBM_BW = 410e9

# ----------------------------------------------------------------------------------------- classification
# A kernel is "bound" by the resource with the highest busy fraction of the total time when that fraction is at
# least BOUND_MIN_BUSY; otherwise no resource is busy most of the time and the dependency latencies along the
# critical path set the time ("latency"). [assumption] 0.5: a resource busy at least half the time is what an
# engineer would optimise first; [PERF] calls 90%+ engine-active good for compute-bound kernels and 60%+ of HBM
# bandwidth good for memory-bound ones.
BOUND_MIN_BUSY = 0.5
PERF_GOOD_ENGINE_ACTIVE = 0.90   # [doc] [PERF]
PERF_GOOD_MBU = 0.60             # [doc] [PERF]

# ---------------------------------------------------------------------------------------- published figures
# [doc] [MMT] fully optimized blocked matmul [4096,8192] @ [8192,8192] bf16 on trn1: 6.97 ms, 85.24% HFU
# (nki-spec 5.5; original tiled 51.80 ms / 10.98%). The calibration test's target.
PUBLISHED_MATMUL_HFU = 0.8524
