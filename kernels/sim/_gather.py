"""nisa gather/search instructions: local_gather, nc_n_gather and sequence_bounds (GpSimd), nc_find_index8 and
nc_match_replace8 (Vector). Semantics from the nki.isa pages (local_gather's numpy reference in aws-neuron-sdk
nki/test/test_nki_isa_local_gather.py; nc_match_replace8's and sequence_bounds' "NumPy equivalent")."""
import numpy as np

from . import dtypes as _dt
from .engines import emit, fail, onchip, same_partitions, store
from .tensor import NkiTensor


def _sbuf_trio(I, a, b, dst):
    """Three SBUF operands with one partition count: returns the free sizes (n_a, n_b, n_dst) and the count."""
    p, _, n = onchip(a[1], I, a[0], ("sbuf",))
    pb, _, nb = onchip(b[1], I, b[0], ("sbuf",))
    pd, _, nd = onchip(dst, I, "dst", ("sbuf",))
    same_partitions(I, a[0], p, b[0], pb)
    same_partitions(I, a[0], p, "dst", pd)
    return p, n, nb, nd


def local_gather(dst, src_buffer, index, num_elem_per_idx=1, num_valid_indices=None, name=None):
    """Each GpSimd core owns 16 partitions: its indices are ``index[16 rows].flatten(order='F')[:num_valid]``
    (partition dim first); partition p of the group reads, for each index k, ``num_elem_per_idx`` contiguous
    elements of its own flattened free dims starting at element ``index_k``:
    ``dst[p, k, e] = src_buffer[p].flat[index_k + e]``. uint16 indices; no dtype conversion; out-of-bounds
    indices are undefined on hardware and refused here."""
    I = "local_gather"
    p, n, ni, nd = _sbuf_trio(I, ("src_buffer", src_buffer), ("index", index), dst)
    if p % 16:
        fail("local_gather.partitions", I, "src_buffer", f"has {p} partitions; must be a multiple of 16", 16)
    if index.dtype != _dt.uint16:
        fail("local_gather.dtype", I, "index", f"is {_dt.name(index.dtype)}; indices must be uint16")
    if dst.dtype != src_buffer.dtype:
        fail("local_gather.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; no casting: must be "
             f"{_dt.name(src_buffer.dtype)}")
    if num_elem_per_idx not in (1, 2, 4, 8, 16, 32):
        fail("local_gather.elems", I, "num_elem_per_idx", f"{num_elem_per_idx}", "1, 2, 4, 8, 16 or 32")
    per_core = 16 * ni
    nv = per_core if num_valid_indices is None else int(num_valid_indices)
    if not 0 < nv <= min(per_core, 4096):
        fail("local_gather.count", I, "num_valid_indices", f"{nv}", f"1..{min(per_core, 4096)}")
    if nd != nv * num_elem_per_idx:
        fail("local_gather.dst", I, "dst", f"has {nd} elements per partition; must be num_valid_indices * "
             f"num_elem_per_idx = {nv * num_elem_per_idx}")
    src = src_buffer._v.reshape(p, n)
    idx = index._v.reshape(p, ni).astype(np.int64)
    out = np.empty((p, nv, num_elem_per_idx), src.dtype)
    for g in range(0, p, 16):
        ks = idx[g:g + 16].flatten(order="F")[:nv]
        if ks.size and (ks.max() + num_elem_per_idx > n):
            fail("local_gather.oob", I, "index", f"index {int(ks.max())} + {num_elem_per_idx} elements exceeds the "
                 f"{n} elements per partition (undefined on hardware)")
        cols = ks[:, None] + np.arange(num_elem_per_idx)[None, :]
        out[g:g + 16] = src[g:g + 16][:, cols]
    dst._v[...] = out.reshape(dst.shape)
    emit("gpsimd", I, (("dst", dst), ("src_buffer", src_buffer), ("index", index)), name)


def nc_n_gather(dst, data, indices, name=None):
    """Per partition, ``dst[p, j] = data[p, :].flatten()[indices[p, j]]`` on GpSimd (SBUF only; uint32 indices
    in [0, elements per partition); dst dtype = data dtype)."""
    I = "nc_n_gather"
    p, n, ni, nd = _sbuf_trio(I, ("data", data), ("indices", indices), dst)
    if indices.dtype != _dt.uint32:
        fail("nc_n_gather.dtype", I, "indices", f"is {_dt.name(indices.dtype)}; must be uint32")
    if dst.dtype != data.dtype:
        fail("nc_n_gather.dtype", I, "dst", f"is {_dt.name(dst.dtype)}; must equal data's {_dt.name(data.dtype)}")
    if nd != ni:
        fail("nc_n_gather.dst", I, "dst", f"has {nd} elements per partition; indices has {ni}", ni)
    idx = indices._v.reshape(p, ni).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        fail("nc_n_gather.oob", I, "indices", f"values {int(idx.min())}..{int(idx.max())} leave [0, {n})", n)
    dst._v[...] = np.take_along_axis(data._v.reshape(p, n), idx, axis=1).reshape(dst.shape)
    emit("gpsimd", I, (("dst", dst), ("data", data), ("indices", indices)), name)


def _eight(I, vals, p):
    pv, _, nv = onchip(vals, I, "vals")
    same_partitions(I, "data", p, "vals", pv)
    if nv != 8:
        fail(f"{I}.vals", I, "vals", f"has {nv} elements per partition; must be 8", 8)
    return vals._f32().reshape(p, 8)


def nc_find_index8(dst, data, vals, name=None):
    """For each partition and each of its 8 ``vals``, the index (from 0) of the first element of the flattened
    data equal to it (compared in fp32) into dst [P, 8] (uint16/uint32). A value absent from data is undefined
    behaviour on hardware and refused here."""
    I = "nc_find_index8"
    p, _, n = onchip(data, I, "data")
    pd, _, nd = onchip(dst, I, "dst")
    same_partitions(I, "data", p, "dst", pd)
    if not 8 <= n <= 16384:
        fail("find_index8.data", I, "data", f"has {n} elements per partition", "8..16384")
    if nd != 8 or dst.dtype not in (_dt.uint16, _dt.uint32):
        fail("find_index8.dst", I, "dst", f"is {list(dst.shape)} {_dt.name(dst.dtype)}; must be [P, 8] uint16/uint32")
    v = _eight(I, vals, p)
    x = data._f32().reshape(p, n)
    hit = x[:, None, :] == v[:, :, None]
    found = hit.any(axis=2)
    if not found.all():
        q, j = np.argwhere(~found)[0]
        fail("find_index8.missing", I, "vals", f"value {v[q, j]!r} (partition {q}, slot {j}) is not in data "
             "(undefined on hardware)")
    dst._v[...] = hit.argmax(axis=2).astype(dst.dtype).reshape(dst.shape)
    emit("vector", I, (("dst", dst), ("data", data), ("vals", vals)), name)


def nc_match_replace8(dst, data, vals, imm, dst_idx=None, name=None):
    """The docs' NumPy equivalent: for each partition and j = 0..7 in order, the first element of the (already
    modified) flattened data equal to vals[j] is replaced by ``imm`` and its index written to dst_idx[j] (0 when
    there is no match; a repeated value therefore matches its next occurrence). dst = the modified data."""
    I = "nc_match_replace8"
    p, _, n = onchip(data, I, "data")
    pd, _, nd = onchip(dst, I, "dst")
    same_partitions(I, "data", p, "dst", pd)
    if n > 16384 or nd != n:
        fail("match_replace8.data", I, "data", f"has {n} elements per partition (dst {nd}); at most 16384, dst "
             "the same", 16384)
    if isinstance(imm, NkiTensor) or not isinstance(imm, (int, float, np.floating, np.integer)):
        fail("match_replace8.imm", I, "imm", "must be a float32 constant")
    v = _eight(I, vals, p)
    x = data._f32().reshape(p, n).copy()
    idx = np.zeros((p, 8), np.uint32)
    for j in range(8):
        eq = x == v[:, j:j + 1]
        has = eq.any(axis=1)
        first = eq.argmax(axis=1)
        rows = np.nonzero(has)[0]
        idx[rows, j] = first[rows]
        x[rows, first[rows]] = np.float32(imm)
    store(dst, x)
    if dst_idx is not None:
        pi, _, ni = onchip(dst_idx, I, "dst_idx")
        same_partitions(I, "data", p, "dst_idx", pi)
        if ni != 8:
            fail("match_replace8.dst_idx", I, "dst_idx", f"has {ni} elements per partition; must be 8", 8)
        dst_idx._v[...] = idx.astype(dst_idx.dtype).reshape(dst_idx.shape)
    emit("vector", I, (("dst", dst), ("data", data), ("vals", vals), ("dst_idx", dst_idx)), name)


def sequence_bounds(dst, segment_ids, name=None):
    """For each element of a [1, n] tile of segment ids, the bounds of its segment (a run of equal consecutive
    ids) into dst [1, 2, n]: ``dst[0, 0, i]`` the index of the run's first element, ``dst[0, 1, i]`` one past its
    last (exclusive end: the page's NumPy equivalent writes ``i + 1`` and ``n``); padding (id 0) gets start ``n``
    and end ``-1``. GpSimd, SBUF, float32 or int32 in and out (nki.isa.sequence_bounds, NKI 0.6). Ids that are
    negative or not integers break the documented precondition and are refused."""
    I = "sequence_bounds"
    p, _, n = onchip(segment_ids, I, "segment_ids", ("sbuf",))
    pd, _, nd = onchip(dst, I, "dst", ("sbuf",))
    if p != 1 or pd != 1:
        fail("sequence_bounds.partitions", I, "segment_ids" if p != 1 else "dst", f"has {p if p != 1 else pd} "
             "partitions; the partition dimension must be 1", 1)
    for role, t in (("segment_ids", segment_ids), ("dst", dst)):
        if t.dtype not in (_dt.float32, _dt.int32):
            fail("sequence_bounds.dtype", I, role, f"is {_dt.name(t.dtype)}; must be float32 or int32")
    if nd != 2 * n:
        fail("sequence_bounds.dst", I, "dst", f"has {nd} elements per partition; must be 2 x {n} ([1, 2, n])")
    ids = segment_ids._v.reshape(n).astype(np.float64)
    bad = (ids < 0) | (ids != np.floor(ids))
    if bad.any():
        k = int(np.argmax(bad))
        fail("sequence_bounds.ids", I, "segment_ids", f"element {k} is {ids[k]!r}; segment ids must be non-negative "
             "integers")
    pos = np.arange(n, dtype=np.int64)
    first = np.ones(n, bool)
    first[1:] = ids[1:] != ids[:-1]
    last = np.ones(n, bool)
    last[:-1] = ids[:-1] != ids[1:]
    start = np.maximum.accumulate(np.where(first, pos, 0))
    end = np.minimum.accumulate(np.where(last, pos + 1, n)[::-1])[::-1]
    pad = ids == 0
    out = np.stack([np.where(pad, n, start), np.where(pad, -1, end)])
    dst._v[...] = out.astype(dst.dtype).reshape(dst.shape)
    emit("gpsimd", I, (("dst", dst), ("segment_ids", segment_ids)), name)
