"""On-chip capacity accounting (SBUF and PSUM bytes per partition).

Lifetimes: a tile is live from its allocation (``nl.ndarray``/``zeros``/... or an implicit allocation by an ``nl``
wrapper) until CPython frees its storage, i.e. when the kernel holds no reference to it or to any view of it
(``weakref.finalize`` on the storage). This approximates the compiler's allocator, which frees a tile after its last
use: a tile that is still referenced but never used again counts here (rebinding a name in a loop frees the old
tile only after the new one is allocated, so the peak of ``t = nl.ndarray(...)`` in a loop is two tiles). Peaks
are reported per kernel launch (reset by each ``nki.jit`` call). SBUF counts the free-dimension bytes of each
tile against trn1's 176 KiB usable per partition (192 KiB minus 16 KiB compiler-reserved); PSUM rounds each tile up
to whole 2 KiB banks against 8 banks per partition. Tiles occupy their byte range on every partition, as the
compiler's allocator places tiles by free-offset range.
"""
import weakref

import numpy as np

from .errors import CapacityError, ConstraintError

SBUF_BYTES_PER_PARTITION = 176 * 1024
PSUM_BANK_BYTES = 2048
PSUM_BANKS = 8
PSUM_BYTES_PER_PARTITION = PSUM_BANK_BYTES * PSUM_BANKS

LIMITS = {"sbuf": SBUF_BYTES_PER_PARTITION, "psum": PSUM_BYTES_PER_PARTITION}


class Allocation:
    __slots__ = ("buffer", "nbytes", "name", "shape", "dtype", "where", "launch")

    def __init__(self, buffer, nbytes, name, shape, dtype, where, launch):
        self.buffer, self.nbytes, self.name = buffer, nbytes, name
        self.shape, self.dtype, self.where, self.launch = shape, dtype, where, launch

    def describe(self):
        return f"{self.name or '<unnamed>'} {list(self.shape)} {self.dtype} {self.nbytes} B/partition at {self.where}"


class _State:
    def __init__(self):
        self.launch = 0
        self.live = {"sbuf": {}, "psum": {}}
        self.used = {"sbuf": 0, "psum": 0}
        self.peak = {"sbuf": 0, "psum": 0}
        self.next_id = 0
        self.in_launch = False
        self.last_peak = None
        self.addr_live = {"sbuf": {}, "psum": {}}      # key -> (lo, hi) bytes per partition of placed tiles
        self.addr_union = {"sbuf": 0, "psum": 0}
        self.backing = {}                              # buffer -> (uint8 bytes, PSUM matmul flags)


_state = _State()


def _new_epoch():
    _state.launch += 1
    _state.live = {"sbuf": {}, "psum": {}}
    _state.used = {"sbuf": 0, "psum": 0}
    _state.peak = {"sbuf": 0, "psum": 0}
    _state.addr_live = {"sbuf": {}, "psum": {}}
    _state.addr_union = {"sbuf": 0, "psum": 0}
    _state.backing = {}


def begin_launch():
    """Start a new accounting epoch (one kernel launch): earlier tiles no longer count."""
    _new_epoch()
    _state.in_launch = True


def end_launch():
    """Close the launch's epoch (its peak stays readable through peak_bytes()); tiles that outlive the launch
    (kept by a traceback, say) never count against later allocations."""
    _state.last_peak = dict(_state.peak)
    _state.in_launch = False
    _new_epoch()


def peak_bytes():
    """{"sbuf": peak bytes/partition, "psum": peak bytes/partition} of the running launch, or of the last one
    when called between launches."""
    return dict(_state.peak) if _state.in_launch or _state.last_peak is None else dict(_state.last_peak)


def live_bytes():
    return dict(_state.used)


def per_partition_bytes(buffer, free_bytes):
    if buffer == "psum":
        return -(-free_bytes // PSUM_BANK_BYTES) * PSUM_BANK_BYTES
    return free_bytes


def track(storage, buffer, free_bytes, name, shape, dtype, where):
    """Register an on-chip storage; raises CapacityError when the buffer would overflow."""
    nbytes = per_partition_bytes(buffer, free_bytes)
    st = _state
    limit = LIMITS[buffer]
    if st.used[buffer] + nbytes > limit:
        live = sorted(st.live[buffer].values(), key=lambda a: -a.nbytes)
        top = "; ".join(a.describe() for a in live[:5]) or "none"
        unit = "SBUF bytes per partition" if buffer == "sbuf" else "PSUM bytes per partition (2 KiB banks)"
        raise CapacityError(
            f"rule capacity.{buffer}: allocation of {name or '<unnamed>'} {list(shape)} {dtype} ({nbytes} B/partition) "
            f"at {where} brings live {unit} to {st.used[buffer] + nbytes} (limit {limit}); "
            f"peak so far {st.peak[buffer]}; largest live tiles: {top}")
    key = _commit(st, storage, buffer, nbytes, _free)
    st.live[buffer][key] = Allocation(buffer, nbytes, name, shape, dtype, where, st.launch)


def _commit(st, storage, buffer, grow, free_fn):
    """Count ``grow`` more live bytes (peak updated) and schedule ``free_fn`` for when ``storage`` dies."""
    key = st.next_id
    st.next_id += 1
    st.used[buffer] += grow
    if st.used[buffer] > st.peak[buffer]:
        st.peak[buffer] = st.used[buffer]
    weakref.finalize(storage, free_fn, buffer, key, st.launch)
    return key


def _free(buffer, key, launch):
    st = _state
    if launch != st.launch:
        return
    a = st.live[buffer].pop(key, None)
    if a is not None:
        st.used[buffer] -= a.nbytes


# ---------------------------------------------------------------------------------------- explicit addresses
# nl.ndarray(..., address=(partition, byte_offset)): tiles live in one byte array per buffer and launch, so tiles
# whose ranges overlap share bytes; the capacity they use is the union of their byte ranges (PSUM: whole banks).
def backing(buffer):
    """(bytes [128 * limit], matmul flags per 4 bytes) of ``buffer``'s explicitly addressed space this launch;
    fresh bytes are 0xFF (NaN in every float dtype)."""
    b = _state.backing.get(buffer)
    if b is None:
        n = 128 * LIMITS[buffer]
        b = (np.full(n, 0xFF, np.uint8), np.zeros(n // 4, bool))
        _state.backing[buffer] = b
    return b


def _union(ranges):
    total, end = 0, None
    for lo, hi in sorted(ranges):
        if end is None or lo >= end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def track_at(storage, buffer, lo, hi, name, shape, dtype, where):
    """Register a tile placed at bytes [lo, hi) of each of its partitions (checked against the buffer's usable
    bytes per partition); raises CapacityError when the live total would exceed the limit."""
    limit = LIMITS[buffer]
    if lo < 0 or hi > limit:
        raise ConstraintError(f"rule address.range: ndarray operand '{name or 'tile'}' address bytes {lo}..{hi} of "
                              f"{buffer} lie outside 0..{limit} per partition (limit {limit})")
    if buffer == "psum":
        lo, hi = lo // PSUM_BANK_BYTES * PSUM_BANK_BYTES, -(-hi // PSUM_BANK_BYTES) * PSUM_BANK_BYTES
    st = _state
    live = st.addr_live[buffer]
    new_union = _union(list(live.values()) + [(lo, hi)])
    grow = new_union - st.addr_union[buffer]
    if st.used[buffer] + grow > limit:
        unit = "SBUF bytes per partition" if buffer == "sbuf" else "PSUM bytes per partition (2 KiB banks)"
        raise CapacityError(
            f"rule capacity.{buffer}: placing {name or '<unnamed>'} {list(shape)} {dtype} at bytes {lo}..{hi} at "
            f"{where} brings live {unit} to {st.used[buffer] + grow} (limit {limit})")
    live[_commit(st, storage, buffer, grow, _free_at)] = (lo, hi)
    st.addr_union[buffer] = new_union


def _free_at(buffer, key, launch):
    st = _state
    if launch != st.launch or st.addr_live[buffer].pop(key, None) is None:
        return
    new_union = _union(st.addr_live[buffer].values())
    st.used[buffer] -= st.addr_union[buffer] - new_union
    st.addr_union[buffer] = new_union
