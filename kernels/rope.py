"""Fused rotary position embedding (RoPE) for q and k in one launch, forward and backward, as NKI kernels.

Reference: ``kernels.reference.apply_rope_ref`` (forward) and ``rope_bwd_ref`` (backward).
Op:        ``kernels.ops.apply_rope``.   Tests: ``tests/test_kernel_rope.py``.

Convention: Hugging Face Llama ``apply_rotary_pos_emb`` (rotate-half), with x = [x1 | x2] split at D/2:
    forward   out = x * cos + rotate_half(x) * sin,        rotate_half(u)   = [-u2 | u1]
              out1 = x1 * cos1 - x2 * sin1 ;  out2 = x2 * cos2 + x1 * sin2
    backward  dx = dy * cos + rotate_half^T(dy * sin),     rotate_half^T(u) = [ u2 | -u1]
              dx1 = dy1 * cos1 + dy2 * sin2 ;  dx2 = dy2 * cos2 - dy1 * sin1
(with HF's cos/sin = cat(freqs, freqs) this equals the forward with sin -> -sin, but the kernel does
not rely on that).

Computation: with a sine table s' (forward [sin2 | sin1], backward sin itself),
    p = cast(x * cos),  r = cast(x * s')                    VectorE, two products per element
    forward   out = cast([p1 - r2 | p2 + r1])               TensorE matmuls accumulating p (identity) and
    backward  dx  = cast([p1 + r2 | p2 - r1])               the two halves of r (moving views; +-identity
                                                            stationaries carry the signs) in fp32 PSUM;
                                                            ScalarE evicts PSUM to the output tile
except for one position per partition in every 16 (a "slot", _slot_steps), whose products ScalarE computes:
ScalarE multiplies only by a per-partition scale, so the slot is transposed to [D, heads, 128 positions]
(TensorE), where cos and s' of one position are [D, 1] columns: two activations per position, each over
the heads only (N = 8..10 < MIN_II, so 64 cycles: ~6x less efficient than VectorE per product, but ScalarE
has the spare time); TensorE transposes the products back, adding them as above.
The backward's s' is the loaded sine tile; the forward's half swap is two ScalarE copies per chunk (a DMA per
half would write one tile twice: the second transfer would wait for the first, then queue behind every load).
Numerics (casting order): all bf16 (x, cos, sin): the two products are rounded to bf16, then summed in fp32
and rounded once more: exactly where PyTorch in bf16 rounds (x * cos, rotate_half(x) * sin, their sum). As soon
as any of x, cos, sin is fp32 the products are fp32 (fp32 matmuls): the output is computed in fp32 and rounded
once to x's dtype (kernels.ops.apply_rope); fp32 tables are kept fp32 (never rounded to bf16), bf16 tables
with fp32 x are used as given (exact in fp32). The negation, the half swaps and the transposes are exact
(each slot transpose pairs its operand with an identity of the same dtype: TensorE takes fp32 only with fp32).

Layout: q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D]. The first S0 = 128 * (S // 128) positions
of a head are read as [128, S // 128, D] (partition p holds positions p * T .. p * T + T - 1, contiguous
in HBM), in the chunks of _plan (at T >= 32: 2 positions with 1-head first loads, so that VectorE starts
after a 64 KiB load; 5; chunks of <= 12 positions with up to 5 heads per DMA; a 3-position last chunk with
small stores so that the stores left after the last product are short); the S - S0 leftover positions are
one [r, 1, D] block. Loads, outputs, tables and products live in byte rings (loads run ahead); a chunk's
cos/sin are loaded while the previous chunk runs, and its s' copies enter ScalarE's in-order queue _BUILD_AFTER
heads after those loads (had they come right behind them, ScalarE would sit idle until the sine arrived, with
the evictions and slot steps queued behind it: that stall left a lag of ~4 us between the products and their
stores, whose backlog then ran 1 us past the last product's store at 7B). cos/sin are loaded once per
(b, chunk) for all q and k heads: minimum HBM bytes.
Why not faster (cost model, Llama 2 7B per rank, HBM floor 46.0 us): with VectorE alone the two products
take 2 x S x D x (Hq + Hkv) / 128 cycles at 1.12 GHz = 58.5 us, plus >= 1.3 us DMA issue latency before the
first product and after the last: <= 74.8% of the roofline. GpSimd shares VectorE's SBUF port (and is
slower), TensorE multiplies only by per-partition scalars. The slots move 2 of 32 positions to ScalarE:
VectorE 55.1 us, ScalarE 49.7 us forward (evictions 23.4 + s' 2.9 + 2 slots x 11.7; 46.8 us backward, no s'
copies); a third slot would make ScalarE (62 us) the bound. DMA queue time is 46.0 us + 0.21 us setup per DMA
(40 DMAs: 54.5 us), so VectorE and DMA are both ~55 us: with the first product at >= 2.0 us and the last store
>= 1.8 us after the last product, the cap of this design is ~58.8 us = 78%; the model gives 60.9 us = 75.6%
(VectorE from 2.0 to 58.6 us with 1.5 us of waits; last eviction 0.5 us later, then the 1.3 us DMA issue
latency and a 0.46 us store: the DMA queues are idle when the final stores arrive). The 3-product (Gauss)
rotation needs equal table halves and failed the 2x criterion in bf16.
"""
from __future__ import annotations

from kernels.nki_compat import nki, nl, nisa

MAX_HEAD_DIM = 128
_X_BYTES = 48 * 1024   # per-partition ring of loaded head groups (byte ring: small chunks pack densely)
_O_BYTES = 48 * 1024   # per-partition ring of rotated head groups awaiting their store
_T_BYTES = 36 * 1024   # per-partition rings of cos / sin / s' chunks (a third each)
_PR_BYTES = 24 * 1024  # per-partition ring of the two products of one head
_PSUM_F = 512          # fp32 elements of one PSUM bank per partition
_NBANK = 4             # PSUM banks cycled by the identity-matmul sums


# Plan at T >= 32 positions per partition, tuned at Llama 2 7B/13B/70B (T = 32) in the cost model: a 2-position
# first chunk with small first loads (1 head, then 3, then 4) starts VectorE ~2 us in; a 5-position chunk and
# chunks of <= 12 positions with up to 5 heads per DMA (fewer, larger DMAs: each costs ~0.21 us of queue time);
# the last middle chunk stores its heads 4 then 1 at a time and a 3-position last chunk 4, 2, 1, 1 at a time, so
# that the stores left after the last product are short. One ScalarE slot per 16 positions (chunk 1 on).
_FIRST, _SECOND = (2, (1, 3, 4)), 5   # (positions, heads per load DMA); positions
_LAST_MID_STORES = (4, 1)
_LAST = (3, (4, 2, 1, 1))
_MID_MAX, _GROUP = 12, 5
_SLOT_EVERY = 16
_SLOT_MAX_HEADS = 12   # xT of one slot: heads x 128 fp32 per partition in <= 3 PSUM banks
# ScalarE time one rotated head leaves free: VectorE 2 n D / 1.12 GHz minus its eviction n D / 1.4 GHz, in slot
# steps of 2 x 64 ScalarE cycles: n D / 85.3 steps for n positions.
_SLOT_DIV = 85
# Rotated heads between a prefetch of the next chunk's tables and its s' copies (forward): by then the sine has
# arrived. 0 gave 7B 61.9 us, 1 61.0 us, 2..4 60.9 us (cost model).
_BUILD_AFTER = 2


def _plan(T, nheads, row_bytes):
    """[(j0, n, load group sizes, store group sizes, slot)] covering positions 0..T-1 per partition; slot: the
    chunk's last position goes through the ScalarE path (_slot_steps) instead of VectorE. row_bytes: one
    position of one head or table per partition (D x itemsize)."""
    cap = max(1, _T_BYTES // 3 // (3 * row_bytes))    # three chunks' tables per ring: current, held, prefetch
    if T < 32:
        k = -(-T // cap)
        plan = [(T // k + (i < T % k), (1,), (1,), False) for i in range(k)]
    else:
        (n0, l0), n1 = _FIRST, _SECOND
        rest = T - n0 - n1 - _LAST[0]
        k = -(-rest // min(_MID_MAX, cap))
        slots = T // _SLOT_EVERY if nheads <= _SLOT_MAX_HEADS and row_bytes <= 256 else 0
        plan = [(n0, l0, _GROUP, False), (n1, _GROUP, _GROUP, slots > 0)] + [
            (rest // k + (i < rest % k), _GROUP, _GROUP if i < k - 1 else _LAST_MID_STORES, i < slots - 1)
            for i in range(k)] + [(_LAST[0], _GROUP, _LAST[1], False)]
    out, j = [], 0
    for n, gl, gs, slot in plan:
        out.append((j, n, gl, gs, slot))
        j += n
    assert j == T, (plan, T)
    return out


def _take(ring, size):
    """Next free [start, start + size) of a byte ring [offset, capacity, held regions]: wraps to 0 when the rest
    is short and skips held regions (tiles whose last use is still to come in program order)."""
    a, wraps = ring[0], 0
    while True:
        if a + size > ring[1]:
            a, wraps = 0, wraps + 1
            assert wraps < 3, "rope ring overrun: plan chunks too big for the held tiles"
        hit = [e for s, e, _ in ring[2] if a < e and s < a + size]
        if not hit:
            break
        a = max(hit)
    ring[0] = a + size
    return a


def _region(buf, ring, rows, shape, hold=None):
    """A [rows, *shape] view of the next free part of the ring buffer buf [P, capacity]; hold: a tag that keeps
    it from reuse until _release(ring, tag)."""
    n = 1
    for s in shape:
        n *= s
    a = _take(ring, n)
    if hold is not None:
        ring[2].append((a, a + n, hold))
    return buf[0:rows, a:a + n].reshape((rows,) + tuple(shape))


def _head_groups(tensors, sizes):
    """[(tensor index, first head, count)]: the heads of all tensors in order, in groups of sizes[0], sizes[1],
    ... (the last repeats), or for an int each tensor's heads in even groups of at most that many; a group
    never spans two tensors."""
    out, i = [], 0
    for t, (src, _) in enumerate(tensors):
        nh, h = src.shape[1], 0
        even = -(-nh // -(-nh // sizes)) if isinstance(sizes, int) else None
        while h < nh:
            g = min(even or sizes[min(i, len(sizes) - 1)], nh - h)
            out.append((t, h, g))
            h, i = h + g, i + 1
    return out


def _release(ring, tag):
    """Let the ring reuse the regions held under tag."""
    ring[2][:] = [r for r in ring[2] if r[2] is not tag]


def _groups(nh, sizes):
    """[(first head, count)] covering heads 0..nh-1 in groups of sizes[0], sizes[1], ... (the last repeats)."""
    out, h, i = [], 0, 0
    while h < nh:
        g = min(sizes[min(i, len(sizes) - 1)], nh - h)
        out.append((h, g))
        h, i = h + g, i + 1
    return out


def _view(t, s0, rows, T, j0, nt, h0, nh):
    """[rows, nh, nt, D] view of positions s0 + p * T + j0 .. + nt - 1 of heads h0.. of a [H, S, D] tensor."""
    v = t[h0:h0 + nh, s0:s0 + rows * T, :].reshape((nh, rows, T, t.shape[-1])).permute((1, 0, 2, 3))
    return v[:, :, j0:j0 + nt, :]


def _tview(t, s0, rows, T, j0, nt):
    """[rows, nt, D] view of the same positions of a [S, D] table."""
    return t[s0:s0 + rows * T, :].reshape((rows, T, t.shape[-1]))[:, j0:j0 + nt, :]


def _identity(P, dt, value=1.0):
    """value x the [P, P] identity (value -1: the negated identity that subtracts in a PSUM accumulation)."""
    ones = nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=value)
    ident = nl.ndarray((P, P), dtype=dt, buffer=nl.sbuf)
    # a = p - j == 0 on the diagonal (GpSimd affine_select, nki-spec 2.6)
    nisa.affine_select(dst=ident, pattern=[[-1, P]], channel_multiplier=1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.equal)
    return ident


def _blocks(S, P, nheads, row_bytes):
    """(position offset, rows, positions per partition T, chunk start, chunk length, load groups, store groups,
    slot)."""
    T = S // P
    out = [(0, P, T) + c for c in _plan(T, nheads, row_bytes)] if T else []
    if S - T * P:
        out.append((T * P, S - T * P, 1, 0, 1, (1,), (1,), False))
    return out


def _bank(st, rows, n, D):
    """[rows, n, D] fp32 view of the next PSUM bank (st: the kernel state dict)."""
    b = st["banks"][st["bank"] % _NBANK]
    st["bank"] += 1
    return b[:, 0:n * D].reshape((b.shape[0], n, D))[0:rows]


def _rotate(st, x_t, cos_t, sp_t, p_t, r_t, o_t, rows, nt, D):
    """o_t = cast(cast(x * cos) +- swap_halves(cast(x * s'))): two VectorE products, TensorE sums (the signs in
    the +-identity stationaries st["signed"]), ScalarE eviction."""
    half = D // 2
    idn = st["ident"][st["pt"]][0:rows, 0:rows]
    i_lo, i_hi = (st["signed"][lo][0:rows, 0:rows] for lo in (0, 1))
    pb = max(1, _PSUM_F // D)                 # positions per PSUM bank
    nisa.tensor_tensor(dst=p_t, data1=x_t, data2=cos_t, op=nl.multiply)
    nisa.tensor_tensor(dst=r_t, data1=x_t, data2=sp_t, op=nl.multiply)
    for j in range(0, nt, pb):
        n = min(pb, nt - j)
        ps = _bank(st, rows, n, D)
        nisa.nc_matmul(dst=ps, stationary=idn, moving=p_t[:, j:j + n, :], accumulate=False)
        nisa.nc_matmul(dst=ps[:, :, 0:half], stationary=i_lo, moving=r_t[:, j:j + n, half:D], accumulate=True)
        nisa.nc_matmul(dst=ps[:, :, half:D], stationary=i_hi, moving=r_t[:, j:j + n, 0:half], accumulate=True)
        nisa.activation(dst=o_t[:, j:j + n, :], op=nl.copy, data=ps)


def _slot_steps(st, xh, cos_t, sp_t, block, b, tag):
    """ScalarE path for the last position j = nt - 1 of a chunk (all heads), as a generator: it yields after
    each step (one partition's position) so that its tiny ScalarE instructions interleave with the VectorE
    path of the following heads, and ends with one store per tensor. xh: the heads' [rows, nt, D] tiles.

    ScalarE multiplies only by a per-partition scale, so the position is transposed (TensorE identity matmuls)
    to [D, heads, rows]: there one (position, d) pair is one partition row of one instruction and cos / s' are
    [D, 1] columns. Per position two activations (x * cos, x * s', rounded to the input dtype as on VectorE),
    then TensorE transposes back and adds p +- swap_halves(r) in fp32 PSUM (signed identities as moving);
    ScalarE evicts. Same casting order as _rotate."""
    s0, rows, T, j0, nt = block[:5]
    D, ident = st["D"], st["ident"]
    half, j, nh = D // 2, nt - 1, len(xh)
    xT, tT = st["xT"][0:D, 0:nh * rows].reshape((D, nh, rows)), st["tT"]
    pT = st["pT"][0:D, 0:nh * rows].reshape((D, nh, rows))
    rT = st["rT"][0:D, 0:nh * rows].reshape((D, nh, rows))
    # each transpose's identity has its operand's dtype (TensorE pairs fp32 only with fp32): exact for both
    for c, tab in enumerate((cos_t, sp_t)):
        nisa.nc_matmul(dst=tT[0:D, c * rows:(c + 1) * rows], stationary=tab[:, j, :],
                       moving=ident[tab.dtype][0:rows, 0:rows], accumulate=False)
    idn = ident[st["dt"]][0:rows, 0:rows]
    for k, x in enumerate(xh):
        nisa.nc_matmul(dst=xT[:, k, :], stationary=x[:, j, :], moving=idn, accumulate=False)
    for ring in ("xr", "crr", "trr"):         # the loaded tiles are consumed (program order)
        _release(st[ring], tag)
    yield
    for p in range(rows):
        nisa.activation(dst=pT[:, :, p], op=nl.copy, data=xT[:, :, p], scale=tT[0:D, p:p + 1])
        nisa.activation(dst=rT[:, :, p], op=nl.copy, data=xT[:, :, p], scale=tT[0:D, rows + p:rows + p + 1])
        yield
    idd, k = ident[st["pt"]][0:D, 0:D], 0
    d_lo, d_hi = (st["signed"][lo][0:D, 0:D] for lo in (0, 1))
    for src, dst in st["tensors"]:
        o = _region(st["o_buf"], st["orr"], rows, (src.shape[1], 1, D))
        for h0, g in _groups(src.shape[1], (max(1, _PSUM_F // D),)):
            ps = _bank(st, rows, g, D)
            for i in range(g):
                nisa.nc_matmul(dst=ps[:, i, :], stationary=pT[:, k, :], moving=idd, accumulate=False)
                nisa.nc_matmul(dst=ps[:, i, 0:half], stationary=rT[:, k, :], moving=d_lo[:, half:D],
                               accumulate=True)
                nisa.nc_matmul(dst=ps[:, i, half:D], stationary=rT[:, k, :], moving=d_hi[:, 0:half],
                               accumulate=True)
                k += 1
            nisa.activation(dst=o[:, h0:h0 + g, 0, :], op=nl.copy, data=ps)
            yield
        nisa.dma_copy(dst=_view(dst[b], s0, rows, T, j0 + j, 1, 0, src.shape[1]), src=o)


def _advance(st, steps):
    """Run the queued ScalarE slots, one after the other, for ``steps`` steps (None: all to their end)."""
    q = st["pending"]
    n = 0
    while q and (steps is None or n < steps):
        if next(q[0], StopIteration) is StopIteration:
            q.pop(0)
        n += 1


def _tables(st, b, block, tag, first_load=None):
    """Load the cos and sin of a chunk; returns (cos tile, s' tile, tag, build): build is None where s' is the
    loaded sine (backward), else the function that emits the forward's two ScalarE copies [sin2 | sin1], for
    the caller to place in program order. first_load: emits the chunk's first x load between cos and sin
    (the first product needs x and cos only)."""
    s0, rows, T, j0, nt = block[:5]
    D, half = st["D"], st["D"] // 2
    cos_t = _region(st["c_buf"], st["crr"], rows, (nt, D), hold=tag)
    sp = _region(st["t_buf"], st["trr"], rows, (nt, D), hold=tag)
    nisa.dma_copy(dst=cos_t, src=_tview(st["cos"][b], s0, rows, T, j0, nt))
    if first_load is not None:
        first_load()
    sin = _tview(st["sin"][b], s0, rows, T, j0, nt)
    if not st["swap"]:                        # backward: s' = sin, loaded in place
        nisa.dma_copy(dst=sp, src=sin)
        return cos_t, sp, tag, None
    sin_t = _region(st["s_buf"], st["srr"], rows, (nt, D))
    nisa.dma_copy(dst=sin_t, src=sin)

    def build():                              # forward: s' = [sin2 | sin1], two ScalarE copies
        nisa.activation(dst=sp[:, :, 0:half], op=nl.copy, data=sin_t[:, :, half:D])
        nisa.activation(dst=sp[:, :, half:D], op=nl.copy, data=sin_t[:, :, 0:half])
    return cos_t, sp, tag, build


def _chunk(st, b, block, nxt):
    """One chunk of positions for every head: loads, rotation (VectorE path; ScalarE slot), stores. A load
    group is loaded just before its heads are rotated (or all first, see below) and a store group stored
    right after. Tiles still to be read later in program order (tables; x when loaded first; a slot's) are
    held in their rings until released (_take skips held tiles). nxt: the next (b, block), whose tables are
    prefetched."""
    s0, rows, T, j0, nt, gl, gs, slot = block
    D, tensors = st["D"], st["tensors"]
    xh, loads = {}, _head_groups(tensors, gl)
    # all loads first (their tiles held): a slot transposes every head; and in the first chunk the next
    # chunk's table loads (prefetched after the first head) must not go ahead of this chunk's small x loads
    nbytes = sum(g for _, _, g in loads) * nt * D * st["dt"].itemsize
    eager = slot or (j0 == 0 and T >= 32 and nbytes <= _X_BYTES // 2)

    def load(t, h0, g):
        x = _region(st["x_buf"], st["xr"], rows, (g, nt, D), hold=tag if eager else None)
        nisa.dma_copy(dst=x, src=_view(tensors[t][0][b], s0, rows, T, j0, nt, h0, g))
        for i in range(g):
            xh[(t, h0 + i)] = x[:, i]

    if st["tables"]:                          # prefetched by the previous chunk
        cos_t, sp, tag, build = st["tables"].pop(0)
        if build is not None:                 # not built yet by the previous chunk
            build()
        load(*loads[0])
    else:
        tag = []                              # holds the tables (and a slot's x tiles) until their last use
        cos_t, sp, tag, build = _tables(st, b, block, tag, lambda: load(*loads[0]))
        if build is not None:
            build()
    if nxt is None:
        _advance(st, None)                    # no slot left over behind the final store
    nv = nt - 1 if slot else nt               # positions on the VectorE path
    if eager:
        for lg in loads[1:]:
            load(*lg)
    if slot:
        order = [(t, h0 + i) for t, h0, g in loads for i in range(g)]
        st["pending"].append(_slot_steps(st, [xh[k] for k in order], cos_t, sp, block, b, tag))
    rate = nv * D // _SLOT_DIV                # slot steps per rotated head
    nrot, built_at = 0, None
    for t, h0, g in _head_groups(tensors, gs):
        o = _region(st["o_buf"], st["orr"], rows, (g, nv, D))
        for i in range(g):
            if (t, h0 + i) not in xh:
                load(*next(lg for lg in loads if lg[0] == t and lg[1] <= h0 + i < lg[1] + lg[2]))
            p_t = _region(st["pr_buf"], st["prr"], rows, (nv, D))
            r_t = _region(st["pr_buf"], st["prr"], rows, (nv, D))
            _rotate(st, xh[(t, h0 + i)][:, 0:nv], cos_t[:, 0:nv], sp[:, 0:nv], p_t, r_t, o[:, i], rows, nv, D)
            _advance(st, rate)
            nrot += 1
            if nxt is not None and not st["tables"]:
                # the next chunk's tables are loaded after this chunk's first head; their s' copies follow
                # _BUILD_AFTER heads later (ScalarE is in order: a copy issued at once would wait for the sine
                # and hold up this chunk's evictions and slot steps) but ahead of this chunk's last evictions,
                # so that the next chunk's first x * s' does not wait behind them
                st["tables"].append(list(_tables(st, nxt[0], nxt[1], [])))
                built_at = nrot + _BUILD_AFTER
            if nrot == built_at and st["tables"][0][3] is not None:
                st["tables"][0][3]()
                st["tables"][0][3] = None
        nisa.dma_copy(dst=_view(tensors[t][1][b], s0, rows, T, j0, nv, h0, g), src=o)
    if not slot:                              # (a slot releases them once it has transposed its position)
        for ring in ("xr", "crr", "trr"):
            _release(st[ring], tag)


@nki.jit
def rope_kernel(q, k, cos, sin, inverse=False):
    """Rotate q and k (forward) or their gradients (inverse=True); returns (q_out, k_out) in q.dtype.

    SBUF per partition: byte rings (x, out 48 KiB each, cos/sin/s' 36 KiB, products 24 KiB), the +-identities
    and the slot products (2 x heads x 128 x product itemsize) -> <= 163 KiB (12 heads, bf16; 170 KiB when x or a
    table is fp32: fp32 slot products, up to 3 identities). PSUM: _NBANK banks + slot transposes (<= 4
    banks)."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    P = nl.tile_size.pmax
    dt = q.dtype
    f32 = nl.float32
    q_out = nl.ndarray(q.shape, dtype=dt, buffer=nl.shared_hbm)
    k_out = nl.ndarray(k.shape, dtype=dt, buffer=nl.shared_hbm)
    it = dt.itemsize
    ct, sit = cos.dtype.itemsize, sin.dtype.itemsize
    blocks = _blocks(S, P, Hq + Hkv, D * max(it, ct, sit))
    # products (and their sums' stationaries) in fp32 as soon as any operand is fp32: an fp32 table is never
    # rounded to bf16, and bf16 x * fp32 table is summed in fp32 and rounded once (all-bf16: bf16 products)
    pt = f32 if f32 in (dt, cos.dtype, sin.dtype) else dt
    st = dict(D=D, dt=dt, pt=pt, cos=cos, sin=sin, tensors=((q, q_out), (k, k_out)),
              ident={dt: _identity(P, dt)}, bank=0, pending=[], tables=[],
              x_buf=nl.ndarray((P, _X_BYTES // it), dtype=dt, buffer=nl.sbuf), xr=[0, _X_BYTES // it, []],
              o_buf=nl.ndarray((P, _O_BYTES // it), dtype=dt, buffer=nl.sbuf), orr=[0, _O_BYTES // it, []],
              t_buf=nl.ndarray((P, _T_BYTES // 3 // sit), dtype=sin.dtype, buffer=nl.sbuf),
              trr=[0, _T_BYTES // 3 // sit, []],
              s_buf=nl.ndarray((P, _T_BYTES // 3 // sit), dtype=sin.dtype, buffer=nl.sbuf),
              srr=[0, _T_BYTES // 3 // sit, []],
              c_buf=nl.ndarray((P, _T_BYTES // 3 // ct), dtype=cos.dtype, buffer=nl.sbuf),
              crr=[0, _T_BYTES // 3 // ct, []],
              pr_buf=nl.ndarray((P, _PR_BYTES // pt.itemsize), dtype=pt, buffer=nl.sbuf),
              prr=[0, _PR_BYTES // pt.itemsize, []],
              banks=[nl.ndarray((P, _PSUM_F), dtype=f32, buffer=nl.psum) for _ in range(_NBANK)])
    slots = any(blk[-1] for blk in blocks)
    if slots:
        nh = Hq + Hkv
        st.update(xT=nl.ndarray((P, nh * P), dtype=f32, buffer=nl.psum),
                  tT=nl.ndarray((P, 2 * P), dtype=f32, buffer=nl.psum),
                  pT=nl.ndarray((P, nh * P), dtype=pt, buffer=nl.sbuf),
                  rT=nl.ndarray((P, nh * P), dtype=pt, buffer=nl.sbuf))
    # r = x * s' with s' = [sin2 | sin1] (forward) or sin (backward); the signs are the identities that add r's
    # halves into the low / high output half: forward out1 = p1 - r2, out2 = p2 + r1; backward dx1 = p1 + r2,
    # dx2 = p2 - r1.
    neg = _identity(P, pt, -1.0)
    # identities of the other dtypes only where needed (all-bf16 emits just the two above)
    for t in (pt,) + ((cos.dtype, sin.dtype) if slots else ()):
        if t not in st["ident"]:
            st["ident"][t] = _identity(P, t)
    one = st["ident"][pt]
    st.update(swap=not inverse, signed=(one, neg) if inverse else (neg, one))
    work = [(b, block) for b in range(B) for block in blocks]
    for n, (b, block) in enumerate(work):
        _chunk(st, b, block, work[n + 1] if n + 1 < len(work) else None)
    _advance(st, None)
    return q_out, k_out


# --------------------------------------------------------------------------- torch-level launchers

_DTYPES = ("torch.bfloat16", "torch.float32")


def _check(q, k, cos, sin, qname, kname):
    for name, t in ((qname, q), (kname, k), ("cos", cos), ("sin", sin)):
        if str(t.dtype) not in _DTYPES:
            raise ValueError(f"kernels/rope.py: {name} has dtype {t.dtype}; supported dtypes are "
                             f"bfloat16 and float32")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"kernels/rope.py: {qname} and {kname} must be 4-D [B, heads, S, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"kernels/rope.py: {kname} shape {tuple(k.shape)} does not match {qname} shape "
                         f"{tuple(q.shape)} in batch, sequence or head_dim")
    if k.dtype != q.dtype:
        raise ValueError(f"kernels/rope.py: {kname} dtype {k.dtype} differs from {qname} dtype {q.dtype}")
    if min(B, Hq, k.shape[1], S, D) < 1:
        raise ValueError(f"kernels/rope.py: empty input {qname} {tuple(q.shape)}, {kname} {tuple(k.shape)}")
    if D % 2 or D > MAX_HEAD_DIM:
        raise ValueError(f"kernels/rope.py: head_dim {D} of {qname} {tuple(q.shape)} must be even and "
                         f"<= {MAX_HEAD_DIM} (one head per partition row)")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (B, S, D):
            raise ValueError(f"kernels/rope.py: {name} has shape {tuple(t.shape)}, expected [B, S, D] = "
                             f"{(B, S, D)}")


def rope_fwd(q, k, cos, sin):
    """q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D] -> (q_rot, k_rot) in q.dtype."""
    _check(q, k, cos, sin, "q", "k")
    return rope_kernel(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous(), inverse=False)


def rope_bwd(dq_rot, dk_rot, cos, sin):
    """Gradients of rope_fwd: (dq_rot, dk_rot) -> (dq, dk) by the transposed rotation."""
    _check(dq_rot, dk_rot, cos, sin, "dq_rot", "dk_rot")
    return rope_kernel(dq_rot.contiguous(), dk_rot.contiguous(), cos.contiguous(), sin.contiguous(),
                       inverse=True)
