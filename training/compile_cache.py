"""torch.compile on CPU: keep inductor's on-disk cache apart per vector ISA (used by train.py --compile and
bench_kernels.trainer)."""
from __future__ import annotations

import os


def tag_compile_cache_with_cpu_isa(env=None) -> str:
    """Put ``$ATEN_CPU_CAPABILITY`` into torch.compile's cache key (``torch.compiler.config.cache_key_tag``); returns
    the tag.

    Inductor generates CPU code for the vector ISA that variable selects, but its FX-graph cache key (torch 2.13)
    does not include that ISA: a graph compiled once for AVX512 and then loaded with ATEN_CPU_CAPABILITY=avx2
    from the same cache directory ran 16-lane kernels built as 8-lane ones, read past its buffers and failed
    (an out-of-bounds index in the loss's scatter, or a segfault: ``python -m bench_kernels.trainer`` with
    ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` after an unrestricted --compile run, issue 15). With the
    tag, each capability gets its own cache entries; without the variable the key is torch's own."""
    import torch.compiler.config as compiler_config
    cap = (os.environ if env is None else env).get("ATEN_CPU_CAPABILITY", "").strip().lower()
    tag = compiler_config.cache_key_tag
    if cap and f"aten-cpu-{cap}" not in tag.split("+"):
        tag = f"{tag}+aten-cpu-{cap}" if tag else f"aten-cpu-{cap}"
        compiler_config.cache_key_tag = tag
    return tag
