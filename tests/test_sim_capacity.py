"""kernels.sim capacity accounting (spec 3.1, checklist 10): live SBUF <= 176 KiB per partition and live PSUM
<= 8 banks of 2 KiB; over that, CapacityError (a ConstraintError) naming the peak and the largest live tensors.
Tiles nobody references any more (e.g. the previous loop iteration's) do not count.
"""
from __future__ import annotations

import numpy as np
import pytest

from sim_helpers import CapacityError, ConstraintError, nisa, nl, run, store

KIB = 1024
SBUF_BYTES = 176 * KIB       # usable per partition on trn1 (192 KiB - 16 KiB reserved)
BANK_FP32 = 512              # fp32 elements of one 2 KiB PSUM bank per partition


def test_capacity_error_is_a_constraint_error():
    assert issubclass(CapacityError, ConstraintError) and issubclass(ConstraintError, ValueError)


def test_sbuf_exactly_full_is_legal():
    def k():
        big = nl.ndarray((128, (SBUF_BYTES - 4 * KIB) // 4), dtype=nl.float32, buffer=nl.sbuf, name="big")
        small = nl.ndarray((128, 1024), dtype=nl.float32, buffer=nl.sbuf, name="small")   # 4 KiB
        nisa.memset(dst=big, value=1.0)
        nisa.memset(dst=small, value=2.0)
        return store(small[:, 0:1])
    np.testing.assert_array_equal(run(k), np.full((128, 1), 2.0, np.float32))


def test_sbuf_over_capacity_names_peak_and_largest():
    def k():
        keep = []
        for i in range(3):
            t = nl.ndarray((128, 60 * KIB // 4), dtype=nl.float32, buffer=nl.sbuf, name=f"slab{i}")   # 60 KiB
            nisa.memset(dst=t, value=float(i))
            keep.append(t)
        return store(keep[0][:, 0:1])
    with pytest.raises(CapacityError) as ei:
        run(k)
    msg = str(ei.value)
    assert "sbuf" in msg.lower(), msg
    assert "slab" in msg, msg                          # names the largest live tensors
    assert "184320" in msg or "180 KiB" in msg, msg     # the peak: 3 x 60 KiB
    assert "180224" in msg or "176 KiB" in msg, msg     # the limit


def test_sbuf_freed_tiles_do_not_count():
    """A 60 KiB tile per iteration, 10 iterations, only one (two during rebinding) alive: legal."""
    def k():
        acc = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=acc, value=0.0)
        for i in range(10):
            t = nl.ndarray((128, 60 * KIB // 4), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=t, value=1.0)
            nisa.tensor_tensor(dst=acc, data1=acc, data2=t[:, 0:1], op=nl.add)
        return store(acc)
    np.testing.assert_array_equal(run(k), np.full((128, 1), 10.0, np.float32))


def test_sbuf_partition_subset_still_counts_per_partition():
    """Capacity is per partition: three 60 KiB tiles on 1 partition each still need 180 KiB on partition 0."""
    def k():
        keep = []
        for i in range(3):
            t = nl.ndarray((1, 60 * KIB // 4), dtype=nl.float32, buffer=nl.sbuf, name=f"row{i}")
            nisa.memset(dst=t, value=1.0)
            keep.append(t)
        return store(keep[0][:, 0:1])
    with pytest.raises(CapacityError):
        run(k)


def test_psum_eight_banks_legal_nine_refused():
    def k(n):
        def body():
            keep = []
            for i in range(n):
                p = nl.ndarray((128, BANK_FP32), dtype=nl.float32, buffer=nl.psum, name=f"acc{i}")
                nisa.memset(dst=p, value=0.0)
                keep.append(p)
            o = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=o, src=keep[-1][:, 0:1])
            return store(o)
        return body
    np.testing.assert_array_equal(run(k(8)), np.zeros((128, 1), np.float32))
    with pytest.raises(CapacityError) as ei:
        run(k(9))
    assert "psum" in str(ei.value).lower()


def test_psum_two_bank_tiles():
    """A [128, 1024] fp32 PSUM tile takes 2 banks: four of them fill the 8 banks, a fifth is over."""
    def k(n):
        def body():
            keep = []
            for i in range(n):
                p = nl.ndarray((128, 2 * BANK_FP32), dtype=nl.float32, buffer=nl.psum)
                nisa.memset(dst=p, value=1.0)
                keep.append(p)
            o = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=o, src=keep[0][:, 0:1])
            return store(o)
        return body
    run(k(4))
    with pytest.raises(CapacityError):
        run(k(5))


def test_psum_freed_per_iteration():
    def k():
        acc = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=acc, value=0.0)
        for _ in range(20):
            p = nl.ndarray((128, BANK_FP32), dtype=nl.float32, buffer=nl.psum)
            nisa.memset(dst=p, value=1.0)
            nisa.tensor_tensor(dst=acc, data1=acc, data2=p[:, 0:1], op=nl.add)
        return store(acc)
    np.testing.assert_array_equal(run(k), np.full((128, 1), 20.0, np.float32))
