"""Instruction trace: the record of every executed instruction (input of the cost model).

Use::

    from kernels.sim import trace
    with trace.record() as tr:
        kernel(x)
    tr.instructions          # list of Instruction
    tr.counts_by_engine()    # {"vector": 12, "dma": 4, ...}
    tr.hbm_bytes()           # (bytes read from HBM, bytes written to HBM)
    trace.last()             # the Trace of the most recent kernel launch (nki.jit / nki.simulate call)
    trace.last().peak_bytes  # {"sbuf": ..., "psum": ...} peak live on-chip bytes per partition of that launch

Each :class:`Instruction` has ``engine`` ("tensor"|"vector"|"scalar"|"gpsimd"|"dma"|"sync"), ``op`` (the nisa
name, e.g. "nc_matmul"), ``operands`` (list of :class:`Operand` ``(role, shape, dtype, buffer, nbytes)``; dtype is
the NKI dtype name, buffer one of "sbuf"|"psum"|"hbm"|"private_hbm"|"shared_hbm"|"const", nbytes = bytes
the operand view covers), ``bytes_hbm_read``, ``bytes_hbm_written``, ``name`` (the ``name=`` argument) and
``alu`` (the ALU op names of tensor_tensor, tensor_scalar, scalar_tensor_tensor and tensor_reduce, e.g.
``("multiply",)`` or ``("subtract", "multiply")`` in application order; None for other instructions): the
cost model's VectorE formulas depend on them.
Records hold shapes only, never tensors, so tracing keeps no memory alive.

Byte ranges (input of the cost model's dependencies, ``kernels.sim.cost``). Each Operand also carries

* ``space``: hashable identity of the address space the operand lives in (``Storage.space``: a unique id per
  storage, or a shared key such as ``("addr", "sbuf")`` for tiles placed at explicit addresses);
* ``span`` = ``(partition_start, partition_count, byte_lo, byte_hi)``: for SBUF/PSUM the partitions covered and
  the byte range ``[byte_lo, byte_hi)`` inside each partition that the view's elements lie in (min to max
  element offset over the free dims, so a strided view covers its gaps), both relative to the space's origin
  (``Storage.base`` added); for HBM ``(0, 1, byte_lo, byte_hi)`` over the flat storage;
* ``access``: ``"r"``, ``"w"`` or ``"rw"`` from :data:`ACCESS_BY_ROLE` (below) and :data:`READ_WRITE_DST_OPS`.

Access table (every role an instruction in ``kernels.sim`` records):

==========================  ======  ====================================================================
role                        access  why
==========================  ======  ====================================================================
dst                         w       the instruction's output (all elements written)
dst of nc_matmul            rw      PSUM accumulation reads the old value (accumulate=True/None)
dst of nc_stream_shuffle    rw      partitions with mask 255 keep their old dst value
reduce_res                  w       read-out of the engine's reduce registers into a [P,1] tile
any other role              r       inputs: src, data, data0/1/2, stationary, moving, bias, scale,
                                    operand0/1, predicate, on_true, on_false, on_true_tile, src_seeds
==========================  ======  ====================================================================
"""
import contextlib
from collections import Counter
from typing import NamedTuple


class Operand(NamedTuple):
    role: str
    shape: tuple
    dtype: str
    buffer: str
    nbytes: int
    space: object = None      # address-space identity (Storage.space)
    span: tuple = None        # (partition_start, partition_count, byte_lo, byte_hi), byte_hi exclusive
    access: str = "r"         # "r" | "w" | "rw"


ACCESS_BY_ROLE = {"dst": "w", "reduce_res": "w"}          # roles not listed are reads
READ_WRITE_DST_OPS = frozenset(("nc_matmul", "nc_stream_shuffle"))


def access_of(op, role):
    """"r", "w" or "rw" for operand ``role`` of instruction ``op`` (the table in the module docstring)."""
    a = ACCESS_BY_ROLE.get(role, "r")
    if a == "w" and role == "dst" and op in READ_WRITE_DST_OPS:
        return "rw"
    return a


class Instruction:
    __slots__ = ("engine", "op", "operands", "bytes_hbm_read", "bytes_hbm_written", "name", "alu")

    def __init__(self, engine, op, operands, bytes_hbm_read=0, bytes_hbm_written=0, name=None, alu=None):
        self.engine = engine
        self.op = op
        self.operands = operands
        self.bytes_hbm_read = bytes_hbm_read
        self.bytes_hbm_written = bytes_hbm_written
        self.name = name
        self.alu = alu

    def operand(self, role):
        for o in self.operands:
            if o.role == role:
                return o
        raise KeyError(role)

    def __repr__(self):
        ops = ", ".join(f"{o.role}={o.buffer}{list(o.shape)}:{o.dtype}" for o in self.operands)
        return f"<{self.engine}.{self.op} {ops}>"


class Trace:
    """An ordered list of executed instructions."""

    def __init__(self):
        self.instructions = []
        self.peak_bytes = None   # launch traces: {"sbuf": peak B/partition, "psum": peak B/partition}

    def __len__(self):
        return len(self.instructions)

    def __iter__(self):
        return iter(self.instructions)

    def counts_by_engine(self):
        return dict(Counter(i.engine for i in self.instructions))

    def counts_by_op(self):
        return dict(Counter(i.op for i in self.instructions))

    def hbm_bytes(self):
        """(bytes read from HBM, bytes written to HBM) over the whole trace."""
        r = w = 0
        for i in self.instructions:
            r += i.bytes_hbm_read
            w += i.bytes_hbm_written
        return r, w


_active = []      # traces currently recording (a launch trace plus any user record() blocks)
_last = None


def emit(instr):
    for t in _active:
        t.instructions.append(instr)


@contextlib.contextmanager
def record():
    """Record every instruction executed inside the block (kernel launches included)."""
    t = Trace()
    _active.append(t)
    try:
        yield t
    finally:
        _active.remove(t)


def last():
    """Trace of the most recent kernel launch, or None before the first launch."""
    return _last


def _begin_launch():
    t = Trace()
    _active.append(t)
    return t


def _end_launch(t):
    global _last
    if t in _active:
        _active.remove(t)
    _last = t
