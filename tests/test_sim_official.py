"""kernels.sim against the documented NKI 0.6 behaviour of issue 12's items 2-4: semantics the interpreter got wrong,
the strictness of the official API (operator tables, dtype and buffer rules), and the NKI language guide's Python
subset. Each test cites the page it is written from (awsdocs-neuron.readthedocs-hosted.com/en/v2.32.0/nki/api/
generated/<name>.html unless stated); expected values are numpy computations of the documented formulas."""
import dataclasses

import numpy as np
import pytest

from kernels.sim import LanguageError, memory, trace
from sim_helpers import BF16, F32, CapacityError, ConstraintError, hbm_out, load, nisa, nki, nl, rand, run, store

X = rand((128, 64), F32, seed=1)


def sb(shape, dt=None):
    return nl.ndarray(shape, dtype=dt or nl.float32, buffer=nl.sbuf)


# ------------------------------------------------------------------------------------------------ item 2
def test_ndarray_address_shares_storage_where_placements_overlap():
    """nl.ndarray(address=(partition, byte_offset)): two tiles placed at the same address are the same bytes
    (a write through one is read through the other), and a tile at a disjoint address is independent."""
    def k(a):
        t1 = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf, address=(0, 0))
        t2 = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf, address=(0, 0))
        t3 = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf, address=(0, 256))
        nisa.dma_copy(dst=t1, src=a)
        nisa.memset(dst=t3, value=7.0)
        out = hbm_out((128, 128), nl.float32)
        nisa.dma_copy(dst=out[:, 0:64], src=t2)
        nisa.dma_copy(dst=out[:, 64:128], src=t3)
        assert t1.buffer == nl.sbuf
        return out
    out = run(k, X)
    np.testing.assert_array_equal(out[:, 0:64], X)
    np.testing.assert_array_equal(out[:, 64:128], 7.0)


def test_ndarray_address_capacity_counts_the_address_range_once():
    """Capacity is counted by address range, not per tile: 16 one-bank PSUM tiles all placed at (0, 0) occupy one
    2 KiB bank, while 16 unplaced one-bank tiles exceed the 8 banks."""
    def tiles(**kw):
        return [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, **kw) for _ in range(16)]

    def placed():
        keep = tiles(address=(0, 0))  # noqa: F841  (live until the kernel returns)
        return hbm_out((128, 1), nl.float32)

    def unplaced():
        keep = tiles()  # noqa: F841
        return hbm_out((128, 1), nl.float32)
    run(placed)
    assert memory.peak_bytes()["psum"] == 2048
    with pytest.raises(CapacityError, match="capacity.psum"):
        run(unplaced)


def test_ndarray_address_storage_carries_the_agreed_space_and_base():
    """The trace contract (issue 11): placed storages share the space ("addr", buffer) and have base = address."""
    seen = {}

    def k():
        t = nl.ndarray((32, 16), dtype=nl.float32, buffer=nl.sbuf, address=(32, 128))
        seen["st"] = (t._st.space, t._st.base)
        nisa.memset(dst=t, value=1.0)
        return hbm_out((1, 1), nl.float32)
    run(k)
    assert seen["st"] == (("addr", "sbuf"), (32, 128))


def test_broadcast_to_from_a_partition_dim_of_one():
    """nl.broadcast_to: "Each dimension must either match or be broadcast from size 1" -- the partition dim too."""
    row = rand((1, 64), F32, seed=2)

    def k(r):
        t = load(r)
        return store(nl.broadcast_to(t, (128, 64)))
    np.testing.assert_array_equal(run(k, row), np.broadcast_to(row, (128, 64)))


def test_kernel_updates_an_input_in_place_and_returns_it():
    """NKI simulator guide: inputs are updated in place; a kernel may write an HBM argument and return it."""
    a = np.zeros((128, 64), np.float32)

    def k(buf, x):
        nisa.dma_copy(dst=buf, src=load(x))
        return buf
    out = run(k, a, X)
    np.testing.assert_array_equal(out, X)
    np.testing.assert_array_equal(a, X)


@pytest.mark.parametrize("dt", [np.int32, np.int16, np.int8])
def test_right_shift_is_logical(dt):
    """nl.right_shift / nisa right_shift: a logical shift of the bit pattern (nki-aluop table: arithmetic shift
    right is not supported) -- negative numbers shift in zeros."""
    a = np.array([[-8, -1, 5, -128]] * 32, dtype=dt)
    bits = 8 * np.dtype(dt).itemsize
    ref = ((a.astype(np.int64) & ((1 << bits) - 1)) >> 2).astype(np.int64)
    ref = np.where(ref >= 1 << (bits - 1), ref - (1 << bits), ref).astype(dt)   # wrap back to the signed dtype

    def k(x):
        t = load(x)
        o = sb((32, 4), t.dtype)
        nisa.tensor_scalar(dst=o, data=t, op0=nl.right_shift, operand0=2)
        return store(o)
    np.testing.assert_array_equal(run(k, a), ref)


@pytest.mark.parametrize("name,ref", [("abs", np.abs), ("square", np.square), ("relu", lambda x: np.maximum(x, 0)),
                                      ("reciprocal", lambda x: 1 / x), ("rsqrt", lambda x: 1 / np.sqrt(x))])
def test_tensor_scalar_unary_operators(name, ref, monkeypatch):
    """nisa.tensor_scalar: "operand0 must be None or 0 when op0 is a unary operator (e.g., nl.abs)"; the unary
    result may be followed by op1. square and relu as op0 are trn3-only (NKI 0.4 release notes: "square and relu
    are now accepted as op0 on trn3")."""
    x = rand((64, 32), F32, seed=3, lo=0.25 if name == "rsqrt" else -2.0)

    def k(a):
        o = sb((64, 32))
        nisa.tensor_scalar(dst=o, data=load(a), op0=getattr(nl, name), operand0=None, op1=nl.add, operand1=1.0)
        return store(o)
    if name in ("square", "relu"):
        with pytest.raises(ConstraintError, match="rule platform"):
            run(k, x)
        monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn3")
    np.testing.assert_allclose(run(k, x), ref(x.astype(np.float64)) + 1.0, rtol=2e-6, atol=1e-6)


def test_var_keeps_the_reduced_axis():
    """nl.var: "keepdims: currently ignored; result always has keepdims=True shape"."""
    def k(a):
        v = nl.var(load(a), axis=1)
        assert v.shape == (128, 1)
        return store(v)
    np.testing.assert_allclose(run(k, X), X.astype(np.float64).var(axis=1, keepdims=True), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ item 3
def test_numpy_ufuncs_and_nl_functions_are_not_operators():
    """op= takes the nl operators of the nki-aluop table, not numpy ufuncs and not nl.sum (a function)."""
    for bad in (np.add, nl.sum):
        def k(a, op=bad):
            o = sb((128, 64))
            t = load(a)
            nisa.tensor_tensor(dst=o, data1=t, data2=t, op=op)
            return store(o)
        with pytest.raises(ConstraintError, match="rule op"):
            run(k, X)


@pytest.mark.parametrize("fn", ["cos", "tan", "floor", "ceil", "trunc"])
def test_activation_takes_only_its_function_table(fn):
    """nisa.activation: op from "Supported Activation Functions for NKI ISA" (no cos/tan/floor/ceil/trunc); the
    nl wrapper of such a function still works (a Vector instruction here)."""
    def k(a):
        o = sb((128, 64))
        nisa.activation(dst=o, op=getattr(nl, fn), data=load(a))
        return store(o)
    with pytest.raises(ConstraintError, match="rule op.activation"):
        run(k, X)
    np.testing.assert_allclose(run(lambda a: store(getattr(nl, fn)(load(a))), X),
                               getattr(np, fn)(X.astype(np.float64)), rtol=2e-6, atol=1e-6)


def test_activation_accepts_prelu():
    """nl.prelu is an activation function (nl.prelu page: "Used as the op parameter in activation ISA
    instructions"); with activation's default slope 0 it equals relu."""
    def k(a):
        o = sb((128, 64))
        nisa.activation(dst=o, op=nl.prelu, data=load(a))
        return store(o)
    np.testing.assert_array_equal(run(k, X), np.maximum(X, 0))


def test_tensor_scalar_reduce_ops_and_modes():
    """nisa.tensor_scalar_reduce: reduce_op "nl.add, nl.multiply, nl.max or nl.min"; reduce_cmd "reset_reduce
    (default), reduce, load_reduce"."""
    def k(a, red=nl.max, cmd=None):
        o = sb((128, 64))
        r = sb((128, 1))
        kw = {} if cmd is None else {"reduce_cmd": cmd}
        nisa.tensor_scalar_reduce(dst=o, data=load(a), op0=nl.multiply, operand0=2.0, reduce_op=red, reduce_res=r,
                                  **kw)
        return store(r)
    np.testing.assert_array_equal(run(k, X), (2 * X).max(axis=1, keepdims=True))
    with pytest.raises(ConstraintError, match="tensor_scalar_reduce"):
        run(lambda a: k(a, nl.subtract), X)
    with pytest.raises(ConstraintError, match="reduce_cmd"):
        run(lambda a: k(a, nl.add, nisa.reduce_cmd.idle), X)


def test_tensor_tensor_scan_refuses_two_psum_inputs():
    """nisa.tensor_tensor_scan: "data0 and data1 cannot both reside in PSUM"."""
    def k(a):
        p0 = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.psum)
        p1 = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.psum)
        t = load(a)
        nisa.tensor_copy(dst=p0, src=t)
        nisa.tensor_copy(dst=p1, src=t)
        o = sb((128, 64))
        nisa.tensor_tensor_scan(dst=o, data0=p0, data1=p1, initial=0.0, op0=nl.multiply, op1=nl.add)
        return store(o)
    with pytest.raises(ConstraintError, match="tensor_tensor_scan.psum"):
        run(k, X)


def test_transpose_and_shuffle_keep_the_dtype():
    """nisa.nc_transpose: "The output dst tile must have the same data type as that of data"; nc_stream_shuffle:
    "dst must have same data type as src"."""
    xb = X.astype(BF16)

    def k_t(a):
        p = nl.ndarray((64, 128), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=p, data=load(a))
        return hbm_out((1, 1), nl.float32)

    def k_s(a):
        o = sb((128, 64))
        nisa.nc_stream_shuffle(dst=o, src=load(a), shuffle_mask=list(range(32)))
        return store(o)
    with pytest.raises(ConstraintError, match="transpose.dtype"):
        run(k_t, xb)
    with pytest.raises(ConstraintError, match="shuffle.dtype"):
        run(k_s, xb)


def test_enums_are_the_official_plain_enums():
    """nki.isa enum values as the official stubs give them; nc_version a plain Enum (not an int)."""
    from kernels.sim import target
    target.refresh()     # the target of the environment (trn1), as a launch would read it
    assert nisa.engine.vector.value == 5 and nisa.dge_mode.hwdge.value == 2 and nisa.dge_mode.none.value == 3
    assert nisa.get_nc_version() is nisa.nc_version.gen2
    assert not isinstance(nisa.nc_version.gen2, int)
    assert nl.hbm is nl.private_hbm and isinstance(nl.sbuf, nl.MemoryRegion)


def test_tfloat32_is_a_distinct_dtype():
    """nl.tfloat32 is its own dtype (1S,8E,10M; nki.language.tfloat32), not float32: a write rounds to a 10-bit
    mantissa (nearest-even), and it pairs with float32 in nc_matmul ("if one of the input tiles is
    tfloat32/float32, the other tile must also be tfloat32/float32")."""
    assert nl.tfloat32 != nl.float32 and nl.tfloat32.itemsize == 4
    a = (1.0 + np.arange(128 * 8).reshape(128, 8) * 2.0 ** -12).astype(np.float32)

    def k(x):
        t = nl.ndarray((128, 8), dtype=nl.tfloat32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        assert t.dtype == nl.tfloat32 and t.dtype != nl.float32
        ps = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=t, moving=load(x[:, 0:8]))
        o = sb((8, 8))
        nisa.tensor_copy(dst=o, src=ps)
        f = sb((128, 8))
        nisa.tensor_copy(dst=f, src=t)
        return store(f), store(o)
    vals, _ = run(k, a)
    bits = a.view(np.uint32).astype(np.uint64)
    ref = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).astype(np.uint32).view(np.float32)   # RNE to 10 bits
    np.testing.assert_array_equal(vals, ref)

    def k_bad(x):
        t = nl.ndarray((128, 8), dtype=nl.tfloat32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        ps = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=t, moving=load(x[:, 0:8], nl.bfloat16))
        return hbm_out((1, 1), nl.float32)
    with pytest.raises(ConstraintError, match="matmul.fp32_pair"):
        run(k_bad, a)


def test_every_raised_rule_has_a_source():
    """Every rule name the interpreter raises is in the rule-source table (kernels.sim.rules.SOURCES)."""
    import pathlib
    import re
    from kernels.sim import rules
    src = pathlib.Path(rules.__file__).parent
    names = set()
    for f in src.glob("*.py"):
        text = f.read_text()
        names |= set(re.findall(r'_?fail\("([a-z0-9_.]+)"', text))
        names |= set(re.findall(r'rule ([a-z_]+(?:\.[a-z0-9_]+)*):', text))
    names = {n for n in names if "{" not in n}
    missing = sorted(n for n in names if rules.source(n) is None)
    assert not missing, f"rules without a source in kernels/sim/rules.py: {missing}"


# ------------------------------------------------------------------------------------------------ item 4
def _kernel_with(body):
    def k(a):
        t = load(a)
        body(t)
        return store(t)
    return k


@pytest.mark.parametrize("what,body", [
    ("numpy", lambda t: np.sum(t)),
    ("numpy", lambda t: np.asarray(t)),
    ("ufunc", lambda t: np.exp(t)),
    ("truth", lambda t: bool(t)),
    ("float", lambda t: float(t[0:1, 0:1])),
    ("index", lambda t: [0, 1][t[0:1, 0:1]]),
])
def test_python_subset_refuses_tensor_values_in_python(what, body):
    """NKI language guide: a kernel is traced, tensor values exist only on the device -- numpy on a tensor,
    reading on-chip values into Python and Python control flow on them are refused, naming the kernel line."""
    with pytest.raises(LanguageError, match=r"rule language\.tensor_value: .*test_sim_official\.py:\d+"):
        run(_kernel_with(body), X)


def test_python_subset_refuses_torch_on_tensors():
    torch = pytest.importorskip("torch")
    with pytest.raises(LanguageError, match="torch function"):
        run(_kernel_with(lambda t: torch.exp(t)), X)


def test_nkiobject_dataclass_like_config():
    """nl.NKIObject: AWS's library subclasses it with un-annotated class attributes as defaults and builds
    instances from keyword arguments; inside a kernel such a config steers Python-level choices."""
    class Cfg(nl.NKIObject):
        tile = 32
        scale = 1.0

    def k(a, cfg=Cfg(scale=2.0)):
        o = sb((128, cfg.tile))
        nisa.tensor_scalar(dst=o, data=load(a[:, 0:cfg.tile]), op0=nl.multiply, operand0=cfg.scale)
        return store(o)
    assert Cfg().tile == 32 and Cfg(tile=8).tile == 8
    np.testing.assert_array_equal(run(k, X), 2 * X[:, 0:32])

    @dataclasses.dataclass(frozen=True, eq=True)
    class Frozen(nl.NKIObject):        # the nki-library pattern: frozen dataclass configuration
        tile: int = 16

    assert Frozen(tile=4).tile == 4 and Frozen() == Frozen(16)


# ------------------------------------------------------------------------------------------------ new names
def test_find_index8_and_match_replace8_documented_tie_breaks():
    """nc_find_index8: index of the *first* occurrence of each value; nc_match_replace8 (the page's NumPy
    equivalent): values matched in order, each replacing the first remaining occurrence, so a repeated value
    matches its next occurrence."""
    data = np.tile(np.array([5, 3, 5, 1, 3, 9, 5, 2, 0, 4, 7, 6], np.float32), (16, 1))
    vals = np.tile(np.array([5, 5, 3, 9, 2, 0, 4, 7], np.float32), (16, 1))

    def k_find(d, v):
        o = nl.ndarray((16, 8), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.nc_find_index8(dst=o, data=load(d), vals=load(v))
        return store(o)

    def k_rep(d, v):
        o = sb((16, 12))
        idx = nl.ndarray((16, 8), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.nc_match_replace8(dst=o, data=load(d), vals=load(v), imm=-1.0, dst_idx=idx)
        return store(o), store(idx)
    np.testing.assert_array_equal(run(k_find, data, vals)[0], [0, 0, 1, 5, 7, 8, 9, 10])
    replaced, idx = run(k_rep, data, vals)
    np.testing.assert_array_equal(idx[0], [0, 2, 1, 5, 7, 8, 9, 10])
    np.testing.assert_array_equal(replaced[0], [-1, -1, -1, 1, 3, -1, 5, -1, -1, -1, -1, 6])


def test_local_gather_matches_the_documented_numpy_semantics():
    """nisa.local_gather (numpy reference of the SDK's test_nki_isa_local_gather.py): per 16-partition core,
    indices flattened partition-first (order 'F'); each partition reads num_elem_per_idx contiguous elements at
    each hardware index (= row * num_elem_per_idx)."""
    rng = np.random.default_rng(0)
    src = rng.random((32, 64, 4)).astype(np.float32)
    idx = np.tile(rng.integers(0, 64, (16, 2)).astype(np.uint16), (2, 1))

    def k(s, i):
        o = nl.ndarray((32, 8, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.local_gather(dst=o, src_buffer=load(s), index=load(i), num_elem_per_idx=4, num_valid_indices=8)
        return store(o)
    ref = np.empty((32, 8, 4), np.float32)
    for g in (0, 16):
        ks = idx[g:g + 16].flatten(order="F")[:8]
        ref[g:g + 16] = np.take(src[g:g + 16], ks, axis=1)
    np.testing.assert_array_equal(run(k, src, idx * 4), ref)


def test_nc_n_gather_and_gather_flattened():
    """nisa.nc_n_gather / nl.gather_flattened: per partition, out[p, j] = data[p].flatten()[indices[p, j]]."""
    idx = np.random.default_rng(1).integers(0, 64, (128, 16)).astype(np.uint32)

    def k(a, i):
        return store(nl.gather_flattened(load(a), load(i)))
    np.testing.assert_array_equal(run(k, X, idx), np.take_along_axis(X, idx.astype(np.int64), axis=1))


def test_vector_indirect_dma_gather_and_skip():
    """nisa.dma_copy indirect gather: ``data.ap(pattern=[[F, P], [1, F]], vector_offset=idx, indirect_dim=0)``
    reads row idx[p] for partition p; with oob_mode.skip an out-of-bounds row is skipped (dst keeps its value)."""
    table = rand((16, 8), F32, seed=4)
    idx = np.array([[3], [0], [15], [99]] * 8, np.uint32)

    def k(t, i, mode):
        ix = nl.ndarray((32, 1), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.dma_copy(dst=ix, src=i)
        d = sb((32, 8))
        nisa.memset(dst=d, value=-1.0)
        nisa.dma_copy(dst=d, src=t.ap(pattern=[[8, 32], [1, 8]], vector_offset=ix, indirect_dim=0), oob_mode=mode)
        return store(d)
    out = run(k, table, idx, nisa.oob_mode.skip)
    rows = idx[:, 0]
    np.testing.assert_array_equal(out[rows < 16], table[rows[rows < 16]])
    np.testing.assert_array_equal(out[rows >= 16], -1.0)
    with pytest.raises(ConstraintError, match="dma.oob"):
        run(k, table, idx, nisa.oob_mode.error)


def test_scalar_offset_and_registers():
    """.ap(scalar_offset=reg, indirect_dim=0) shifts the view by reg * stride of that dim; registers move, load and
    store 32-bit values (nisa.register_* pages); fori_loop passes the iteration value as a register."""
    def k(a):
        r = nisa.register_alloc(2)
        o = sb((1, 64))
        nisa.dma_copy(dst=o, src=a.ap(pattern=[[64, 1], [1, 64]], scalar_offset=r, indirect_dim=0))
        cnt = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.memset(dst=cnt, value=0)
        acc = nisa.register_alloc(0)

        def body(i):
            nisa.register_move(acc, i)
        nl.fori_loop(0, 5, body)
        nisa.register_store(cnt, acc)
        return store(o), store(cnt)
    row, last = run(k, X)
    np.testing.assert_array_equal(row[0], X[2])
    assert last[0, 0] == 4


def test_tensor_copy_predicated_and_cumulative():
    """tensor_copy_predicated: dst = src where predicate (reverse_pred inverts), unchanged elsewhere;
    tensor_scalar_cumulative: reg = op1(op0(src[i], imm0), reg), dst[i] = reg (reset_reduce: add starts at 0)."""
    pred = (np.arange(128 * 64).reshape(128, 64) % 3 == 0).astype(np.uint8)

    def k(a, p):
        pt = nl.ndarray((128, 64), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.dma_copy(dst=pt, src=p)
        d = sb((128, 64))
        nisa.memset(dst=d, value=0.5)
        nisa.tensor_copy_predicated(dst=d, src=load(a), predicate=pt)
        c = sb((128, 64))
        nisa.tensor_scalar_cumulative(dst=c, src=load(a), op0=nl.multiply, op1=nl.add, imm0=2.0)
        out = hbm_out((128, 128), nl.float32)
        nisa.dma_copy(dst=out[:, 0:64], src=d)
        nisa.dma_copy(dst=out[:, 64:128], src=c)
        return out
    out = run(k, X, pred)
    np.testing.assert_array_equal(out[:, 0:64], np.where(pred != 0, X, 0.5))
    np.testing.assert_allclose(out[:, 64:128], np.cumsum(2.0 * X.astype(np.float64), axis=1), rtol=1e-5,
                               atol=1e-5)


def test_newer_core_instructions_refuse_trn1_with_the_rule():
    """Instructions "available only on NeuronCore-v3/v4" exist with their official signatures and refuse trn1
    with rule platform; nl.abs_max (trn3 only) likewise."""
    def k(a):
        o = sb((128, 64))
        nisa.exponential(dst=o, src=load(a))
        return store(o)
    with pytest.raises(ConstraintError, match="rule platform: exponential"):
        run(k, X)
    with pytest.raises(ConstraintError, match="rule platform"):
        run(lambda a: store(nl.abs_max(load(a), load(a))), X)


def test_collectives_single_rank():
    """nki.collectives on the interpreter's single rank: all_reduce over [[0]] copies src to dst; a group naming
    other ranks is refused with rule collectives.ranks."""
    def k(a, groups):
        d = hbm_out((128, 64), nl.float32)
        nki.collectives.all_reduce([a], [d], nki.collectives.ReplicaGroup(groups), nl.add)
        return d
    np.testing.assert_array_equal(run(k, X, [[0]]), X)
    with pytest.raises(ConstraintError, match="collectives.ranks"):
        run(k, X, [[0, 1]])


def test_dma_compute_sums_sources():
    """nisa.dma_compute: dst = reduce_op(srcs[0] * scales[0], ...) with nl.add and unit scales, in fp32."""
    def k(a):
        t = load(a)
        d = sb((128, 64))
        nisa.dma_compute(dst=d, srcs=[t, t, a], reduce_op=nl.add)
        return store(d)
    np.testing.assert_array_equal(run(k, X), 3 * X)
    with trace.record() as tr:
        run(k, X)
    assert "dma_compute" in tr.counts_by_op()


def test_tensor_view_methods_of_the_nkitensor_page():
    """nl.NkiTensor page: rearrange (einops-style split/reorder/merge), get_pattern ([[stride, count], ...]),
    is_contiguous skipping the partition dim of on-chip tensors, reinterpret_cast = view, vector_select rows."""
    seen = {}

    def k(a):
        t = load(a)                                           # [128, 64]
        r = t.rearrange(("p", ("h", "w")), ("p", "w", "h"), {"h": 4})
        seen["shape"], seen["pattern"] = r.shape, r.get_pattern()
        seen["contig"] = (t.is_contiguous(), t[:, 0:32].is_contiguous(), r.is_contiguous())
        seen["cast"] = t.reinterpret_cast(nl.int32).dtype == nl.int32
        o = sb((128, 16, 4))
        nisa.tensor_copy(dst=o, src=r)
        return store(o)
    out = run(k, X)
    assert seen["shape"] == (128, 16, 4) and seen["pattern"] == [[64, 128], [1, 16], [16, 4]]
    assert seen["contig"] == (True, True, False) and seen["cast"]
    np.testing.assert_array_equal(out, X.reshape(128, 4, 16).transpose(0, 2, 1))

    rows = np.array([[5], [0], [7]], np.uint32)

    def k_rows(table, idx):
        ix = nl.ndarray((3, 1), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.dma_copy(dst=ix, src=idx)
        d = sb((3, 64))
        nisa.dma_copy(dst=d, src=table.vector_select(0, ix))
        return store(d)
    np.testing.assert_array_equal(run(k_rows, X[0:8], rows), X[rows[:, 0]])


def test_dma_transpose_permutations_of_the_page():
    """nisa.dma_transpose: 3-d permutation (2, 1, 0) and 4-d (3, 1, 2, 0); dst in SBUF, same dtype."""
    a3 = rand((4, 3, 8), F32, seed=5)
    a4 = rand((2, 3, 4, 8), F32, seed=6)

    def k3(a):
        o = nl.ndarray((8, 3, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_transpose(dst=o, src=a)
        return store(o)

    def k4(a):
        o = nl.ndarray((8, 3, 4, 2), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_transpose(dst=o, src=a, axes=(3, 1, 2, 0))
        return store(o)
    np.testing.assert_array_equal(run(k3, a3), a3.transpose(2, 1, 0))
    np.testing.assert_array_equal(run(k4, a4), a4.transpose(3, 1, 2, 0))
    with pytest.raises(ConstraintError, match="dma_transpose.axes"):
        run(lambda a: (nisa.dma_transpose(dst=nl.ndarray((8, 3, 4), dtype=nl.float32, buffer=nl.sbuf), src=a,
                                          axes=(1, 2, 0)), hbm_out((1, 1), nl.float32))[1], a3)


def test_loops_registers_and_buffers_helpers():
    """nl.while_loop(init, body_fun) runs while the register is non-zero; dynamic_range takes register bounds;
    a register never written is refused; nl.is_hbm/is_sbuf/is_psum/is_on_chip classify memory regions."""
    count = []

    def k(a):
        r = nisa.register_alloc(3)

        def body(reg):
            count.append(int(reg))
            nisa.register_move(reg, int(reg) - 1)
            return reg
        nl.while_loop(r, body)
        n = sum(1 for _ in nl.dynamic_range(nisa.register_alloc(4)))
        count.append(n)
        assert nl.is_hbm(a.buffer) and nl.is_hbm(nl.shared_hbm) and not nl.is_on_chip(nl.hbm)
        assert nl.is_sbuf(nl.sbuf) and nl.is_psum(nl.psum) and nl.is_on_chip(nl.psum)
        return store(load(a))
    run(k, X)
    assert count == [3, 2, 1, 4]
    with pytest.raises(ConstraintError, match="register.uninitialised"):
        run(lambda a: (nl.fori_loop(0, nisa.register_alloc(), lambda i: None), store(load(a)))[1], X)


def test_shared_constant_and_random_seed():
    """nl.shared_constant(constant): a shared_hbm tensor of the array's values; nl.random_seed(seed) makes nl.rand
    reproducible ("Using the same seed will generate the same sequence")."""
    const = np.arange(128 * 4, dtype=np.float32).reshape(128, 4)

    def k(a):
        c = nl.shared_constant(const)
        seed = nl.full((1, 1), 42, dtype=nl.int32, buffer=nl.sbuf)
        nl.random_seed(seed)
        r1 = nl.rand((128, 4), dtype=nl.float32)
        nl.random_seed(seed)
        r2 = nl.rand((128, 4), dtype=nl.float32)
        return c, store(r1), store(r2)
    c, r1, r2 = run(k, X)
    np.testing.assert_array_equal(c, const)
    np.testing.assert_array_equal(r1, r2)
    assert ((0 <= r1) & (r1 < 1)).all()


# ------------------------------------------------------------------------------- names added in NKI 0.6
def _documented_sequence_bounds(ids):
    """The per-row loops of the nki.isa.sequence_bounds page's "NumPy equivalent", restated element by element:
    a start index carried forward while the id repeats, an exclusive end carried backward; id 0 is padding."""
    n = len(ids)
    start, end = [0] * n, [0] * n
    for i in range(n):
        if ids[i] == 0:
            start[i] = n
        elif i > 0 and ids[i] == ids[i - 1]:
            start[i] = start[i - 1]
        else:
            start[i] = i
    for i in reversed(range(n)):
        if ids[i] == 0:
            end[i] = -1
        elif i < n - 1 and ids[i] == ids[i + 1]:
            end[i] = end[i + 1]
        else:
            end[i] = i + 1
    return np.array([start, end])


@pytest.mark.parametrize("dt", ["float32", "int32"])
def test_sequence_bounds_matches_the_documented_numpy_equivalent(dt):
    """nki.isa.sequence_bounds(dst, segment_ids): dst [1, 2, n] holds each element's segment start and exclusive
    end; padding (id 0) gets (n, -1); float32 or int32; the partition dimension must be 1."""
    rng = np.random.default_rng(3)
    ids = np.sort(rng.integers(0, 12, 96)).astype(dt).reshape(1, 96)
    ids[0, 40:44] = 0                                  # padding inside a run splits it
    ids[0, -1] = 0

    def k(s):
        seg = nl.ndarray((1, 96), dtype=getattr(nl, dt), buffer=nl.sbuf)
        nisa.dma_copy(dst=seg, src=s)
        o = nl.ndarray((1, 2, 96), dtype=getattr(nl, dt), buffer=nl.sbuf)
        nisa.sequence_bounds(dst=o, segment_ids=seg)
        return store(o)
    out = run(k, ids)
    np.testing.assert_array_equal(out.reshape(2, 96), _documented_sequence_bounds(list(ids[0])))
    assert trace.last().instructions[-2].engine == "gpsimd"

    def k_rows(s):
        seg = nl.ndarray((2, 48), dtype=getattr(nl, dt), buffer=nl.sbuf)
        nisa.dma_copy(dst=seg, src=s)
        o = nl.ndarray((2, 2, 48), dtype=getattr(nl, dt), buffer=nl.sbuf)
        nisa.sequence_bounds(dst=o, segment_ids=seg)
        return store(o)
    with pytest.raises(ConstraintError, match="sequence_bounds.partitions"):
        run(k_rows, ids.reshape(2, 48))
    with pytest.raises(ConstraintError, match="sequence_bounds.ids"):
        run(k, np.where(np.arange(96) == 5, -1, ids).astype(dt).reshape(1, 96))


def test_topk_all_gather_v_and_sub_version():
    """nki.isa.topk and nki.collectives.all_gather_v (new in 0.6, pages "relevant for Trn2, Trn3") refuse trn1 with
    rule platform; nisa.get_nc_sub_version() is an int (AWS's nki-library compares it with 1 under gen4)."""
    def k_topk(a):
        v = nl.ndarray((16, 8), dtype=nl.bfloat16, buffer=nl.sbuf)
        i = nl.ndarray((16, 8), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.topk(val_dst=v, idx_dst=i, src=load(a[0:16, :], nl.bfloat16), n=16 * 64)
        return store(v)

    def k_agv(a):
        d = hbm_out((128, 64), nl.float32)
        m = hbm_out((4, 1), nl.int32)
        nki.collectives.all_gather_v([a], [d], nki.collectives.ReplicaGroup([[0]]), m)
        return d
    with pytest.raises(ConstraintError, match="rule platform: topk"):
        run(k_topk, X)
    with pytest.raises(ConstraintError, match="rule platform: all_gather_v"):
        run(k_agv, X)
    assert isinstance(nisa.get_nc_sub_version(), int)
