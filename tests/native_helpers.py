"""Shared pieces of the native-extension tests: loading (building on first use) and thread-count control.

The extension must load: a failed build fails the tests that need it, with the cause. The one exception is a
machine without any C++ compiler, where the native path cannot exist and the PyTorch path is what runs (the
fallback itself is tested in tests/test_native_build.py).
"""
from __future__ import annotations

import contextlib

import pytest
import torch


def require_native():
    """kernels.native, loaded (built first if needed); fails the test when it cannot be."""
    import kernels.native as native
    if not native.available():
        if native._compiler()[0] is None:
            pytest.skip(f"no C++ compiler on this machine: {native.unavailable_reason()}")
        pytest.fail(f"the native extension did not build/load: {native.unavailable_reason()}")
    return native


@contextlib.contextmanager
def threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def isa(name: str):
    """Run the native ops on one compiled variant (DEFAULT, AVX2, AVX512); restores the loader's choice."""
    select = torch.ops.llama_kernels.native_select_isa
    previous = select("")
    got = select(name)
    try:
        yield got
    finally:
        select(previous)

