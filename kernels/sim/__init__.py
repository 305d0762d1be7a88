"""kernels.sim: a CPU interpreter of the NKI language, NKI 0.6 (Neuron SDK 2.32, the ``nki`` namespace) for trn1.

Public API::

    from kernels.sim import nki, nl, nisa, ConstraintError, CapacityError, LanguageError, install_as_nki, trace

    @nki.jit
    def kernel(x):                      # x: HBM tensor
        out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm)
        ...
        return out
    y = kernel(np_array)                # numpy in -> numpy out; CPU torch in -> torch out
    y = nki.simulate(kernel)(np_array)  # same

Surface: ``nki``, ``nl`` (nki.language), ``nisa`` (nki.isa), ``nki.collectives`` and ``nki.typing`` export exactly
the official 0.6 names with the official parameter names, order and defaults (tests/nki_api_table.py, written from
AWS's API reference, and tests/test_sim_api.py hold them both ways; the few official names not provided are listed
there with the reason). Interpreter helpers live in private modules/names.

What is simulated (as the official ``nki.simulate`` documents it): eager, sequential execution of every ``nisa``/
``nl`` call; fresh memory filled with NaN (floats) or 4 (ints); bf16/fp8 stored through ``ml_dtypes`` and rounded to
nearest-even on every write (fp32 -> int: round-to-nearest-even and saturate; tfloat32: fp32 storage rounded to a
10-bit mantissa); fp32 arithmetic inside the Vector, Scalar and GpSimd engines; fp32 PSUM with matmul
accumulation; DMA gathers/scatters through ``.ap(vector_offset=)``, dynamic offsets through registers.
Every instruction checks the NeuronCore-v2 rules (partition count <= 128 and the partition-start rule,
matmul/transpose limits, PSUM bank, engine/buffer restrictions, dtype rules, the operator table of each instruction,
v3+-only instructions and operators) and raises :class:`ConstraintError` (a ``ValueError`` and an
``nisa.NkiValidationError``) whose message reads ``rule <name>: <instruction> operand '<role>' <what> (limit <x>)``;
``kernels.sim.rules`` names the source of every rule. The NKI language guide's Python subset is enforced where the
interpreter can see it: numpy/torch called on a tensor, a tensor value read into Python (``float(t)``, ``if t:``,
indexing with a tensor) raise :class:`LanguageError` naming the kernel's source line.

Capacity and lifetimes: live SBUF bytes per partition may not exceed 176 KiB (trn1's usable SBUF) and live PSUM
may not exceed 8 banks of 2 KiB per partition (each PSUM tile rounded up to whole banks); an overflow raises
:class:`CapacityError` naming the peak, the limit and the largest live tiles with their allocation lines. A tile is
live from its allocation until CPython frees it (no reference to it or to any view of it remains), which
approximates the compiler's allocator (that frees after last use); peaks are per kernel launch
(``kernels.sim.memory.peak_bytes()``, also kept as ``trace.last().peak_bytes``). Tiles placed with
``nl.ndarray(..., address=(partition, byte_offset))`` share bytes where their ranges overlap and count once per
byte range.

Trace: every executed instruction is recorded; ``with trace.record() as tr: ...`` collects them,
``trace.last()`` is the trace of the latest kernel launch; ``tr.instructions`` holds ``Instruction(engine, op,
operands, bytes_hbm_read, bytes_hbm_written, name)`` with ``Operand(role, shape, dtype, buffer, nbytes, ...)``;
``tr.counts_by_engine()``, ``tr.counts_by_op()``, ``tr.hbm_bytes()``.

Platform: ``NEURON_PLATFORM_TARGET_OVERRIDE`` in {trn1, gen2, inf2} (NeuronCore-v2, default), {trn2, gen3} (v3),
{trn3, gen4} (v4), read at every launch (or ``kernels.sim.target.set_target(name)``); v3+ relaxes the v2-only
rules (scalar activation bias, non-add activation reduce, bf16 matmul dst, rng on other engines, matmul perf
mode, hwdge); v3/v4-only instructions exist with their official signatures and raise ConstraintError (rule
``platform``) on trn1 and NotImplementedError above it.

Known differences from hardware: activation functions are exact numpy formulas, not the Scalar engine's
piecewise-polynomial approximations (so no out-of-range garbage such as HW ``sin(9.0)``); the PRNG (``rng``,
``dropout``, ``nl.rand``) is numpy's PCG64, so bit streams differ from hardware (only statistics are comparable);
matmul sums in numpy fp32 order; no timing or engine concurrency (the trace feeds a separate cost model); the
Tensor-engine transpose is exact even for NaN/Inf (trn1's is not); element order of a DMA between differently shaped
views is row-major over each view; dtypes are numpy dtypes (they compare equal to the official dtype names; the
tfloat32 dtype object is a marker, its tiles hold float32 values rounded to 10 mantissa bits); registers and dynamic loops (``fori_loop``, ``while_loop``, ``dynamic_range``) hold
and run on concrete values; collectives run on one rank only; behaviour the docs call undefined (an
``nc_find_index8`` value absent from the data, an out-of-bounds ``local_gather`` index, ``accumulate=True`` onto
PSUM not written by a matmul) raises instead.

PSUM accumulation (``nisa.nc_matmul``): every PSUM element carries a "last written by a matmul" flag (cleared at
allocation and by any other write, nc_transpose included, such as memset/tensor_copy/activation). ``accumulate=None``
overwrites unflagged elements and accumulates onto flagged ones; ``accumulate=False`` overwrites;
``accumulate=True`` raises ConstraintError unless every element is flagged (hardware UB; the official simulator only
warns). Reading a PSUM tile does not end an accumulation group: start a fresh group with a new PSUM tile or
``accumulate=False``.

Modules: ``isa`` (nisa), ``language`` (nl), ``nki`` (the namespace), ``collectives``, ``typing``, ``tensor``
(NkiTensor views), ``objects`` (NKIObject, MemoryRegion), ``memory`` (capacity accounting), ``trace``, ``target``
(platform), ``dtypes``, ``ops`` (ALU/activation functions and the per-instruction operator tables), ``rules``
(the source of each rule), ``engines`` (shared rule checks), ``jit`` (launches), ``errors``; ``_gather`` and
``_newer`` hold instructions nisa re-exports.

Launch bracket: ``kernel[n](...)`` is the logical-NeuronCore degree (NKI >= 0.3): only 1 on trn1, 1 or 2 on trn2+
(the two instances run one after another); multi-dimensional SPMD grids are refused. A kernel returns HBM tensors
(``nl.shared_hbm``/``nl.hbm`` allocations, or an input it updated in place).

Third-party kernels: ``install_as_nki()`` makes ``import nki``, ``import nki.language``, ``import nki.isa``,
``import nki.collectives`` and ``import nki.typing`` resolve to this interpreter (refused when a real ``nki`` is
installed).
"""
import importlib.util
import sys

from . import isa as nisa
from . import language as nl
from . import nki
from . import memory, target, trace  # noqa: F401
from .errors import CapacityError, ConstraintError, LanguageError
from .tensor import NkiTensor

__all__ = ["nki", "nl", "nisa", "ConstraintError", "CapacityError", "LanguageError", "install_as_nki", "trace",
           "NkiTensor",
           "memory", "target"]


def install_as_nki():
    """Register the interpreter as the modules ``nki``, ``nki.language`` and ``nki.isa`` so that kernels written
    for the official simulator run unmodified. Refuses when a real ``nki`` package is importable (it is never
    shadowed). Idempotent."""
    cur = sys.modules.get("nki")
    if cur is nki:
        return nki
    if cur is not None:
        raise ImportError("install_as_nki: a module named 'nki' is already imported "
                          f"({getattr(cur, '__file__', cur)}); refusing to replace it")
    spec = importlib.util.find_spec("nki")
    if spec is not None:
        raise ImportError(f"install_as_nki: a real 'nki' package is installed at {spec.origin or spec.name}; "
                          "refusing to shadow it (use `from kernels.nki_compat import nki, nl, nisa`)")
    sys.modules["nki"] = nki
    sys.modules["nki.language"] = nl
    sys.modules["nki.isa"] = nisa
    sys.modules["nki.collectives"] = nki.collectives
    sys.modules["nki.typing"] = nki.typing
    return nki
