"""Loader of the native CPU extension (``CMakeLists.txt`` + the C++ sources beside this file).

The extension holds the bf16 stochastic-rounding training hot path for CPU as ``torch.ops.llama_kernels.native_*``
ops: the fp32 -> bf16 SR cast, a fused AdamW-SR step, RMSNorm and SwiGLU forward and backward (numerics in the
C++ comments; they mirror kernels/reference.py and training.optim.SRAdamW op for op).

Build: once, at first use, with CMake + ninja (from PyPI: requirements.txt) and the installed torch's CMake
package, into ``$LLAMA_TRN_NATIVE_CACHE`` (default ``~/.cache/llama-trn/native``) under a directory named by a
hash of the sources, the torch version, the compiler and the platform. Builds run in a temporary directory under
a file lock (two processes never build at once; the second one loads what the first built), and the library is
renamed into place only when complete. One line on stderr says a build is running and how long it took.
With no compiler, no CMake, or a failed build, ``available()`` is False, everything runs on the PyTorch path,
and a one-time notice names the cause (``unavailable_reason()``).

Use: ``set_mode("auto" | "on" | "off")`` (or ``$LLAMA_NATIVE``; the library default is "off", ``train.py``'s is
"auto"). ``enabled()`` is what callers (kernels.ops, training.optim) consult: True when the mode is not "off"
and the extension is loaded; mode "on" with the extension unavailable is a RuntimeError naming the cause.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

MODES = ("auto", "on", "off")
_ENV_MODE = "LLAMA_NATIVE"
_ENV_CACHE = "LLAMA_TRN_NATIVE_CACHE"
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_LIB = "libllama_native.so"
_SOURCES = ("counter_rng.h", "kernels.h", "kernels_isa.cpp", "ops.cpp")

_state = dict(loaded=False, tried=False, reason=None, isa=None, path=None, build_s=None)


def _mode_from_env() -> str:
    mode = os.environ.get(_ENV_MODE, "").strip() or "off"
    if mode not in MODES:
        raise ValueError(f"kernels.native: ${_ENV_MODE}={mode!r}; valid values are {', '.join(MODES)}")
    return mode


_mode = _mode_from_env()


def set_mode(mode: str) -> None:
    """"auto": native kernels where they apply when the extension builds/loads; "on": the same, but an unavailable
    extension is an error; "off": the PyTorch path everywhere."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels.native.set_mode: {mode!r}; valid values are {', '.join(MODES)}")
    _mode = mode
    if mode == "on" and not available():
        raise RuntimeError(f"kernels.native: --native on, but the native extension is unavailable: "
                           f"{_state['reason']}")


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def use_mode(mode: str):
    previous = _mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


def enabled() -> bool:
    """True when the native kernels should run: mode "auto"/"on" and the extension loaded."""
    return _mode != "off" and available()


def available() -> bool:
    """Whether the extension is loaded (building it on the first call if needed)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _load()
        except (_Unavailable, OSError) as e:          # OSError: an unwritable cache directory, a vanished file
            _state["reason"] = str(e)
            print(f"kernels.native: native CPU kernels unavailable ({e}); using the PyTorch path", file=sys.stderr,
                  flush=True)
    return _state["loaded"]


def unavailable_reason() -> str | None:
    return _state["reason"]


def info() -> dict:
    """What was loaded: isa (the variant in use), path (the library), build_s (seconds, when this process built)."""
    available()
    return dict(loaded=_state["loaded"], isa=_state["isa"], path=_state["path"], build_s=_state["build_s"],
                reason=_state["reason"])


class _Unavailable(Exception):
    pass


# --------------------------------------------------------------------------- build

def _tool(name: str) -> str | None:
    """An executable on PATH, else in this Python's scripts directory (where pip puts cmake and ninja)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    return candidate if os.access(candidate, os.X_OK) else None


def _compiler() -> tuple[str | None, str]:
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx):
        return None, ""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, ""
    return shutil.which(cxx), version.splitlines()[0] if version else ""


def cache_key() -> str:
    """Hash of what the built library depends on: sources, torch version, compiler, platform."""
    h = hashlib.sha256()
    for name in ("CMakeLists.txt",):
        with open(os.path.join(_ROOT, name), "rb") as fh:
            h.update(fh.read())
    for name in _SOURCES:
        with open(os.path.join(_HERE, name), "rb") as fh:
            h.update(name.encode() + fh.read())
    cxx, version = _compiler()
    h.update(f"{torch.__version__}|{cxx}|{version}|{platform.machine()}|{sys.platform}".encode())
    return h.hexdigest()[:16]


def cache_root() -> str:
    return os.environ.get(_ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "llama-trn", "native")


def _run(cmd, cwd, log):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise _Unavailable(f"{os.path.basename(cmd[0])} failed (exit {proc.returncode}): " + " | ".join(tail))


def _build(target_dir: str) -> float:
    """Configure and build into a temporary directory; move the library to target_dir/_LIB when complete."""
    cxx, _ = _compiler()
    if cxx is None:
        raise _Unavailable("no C++ compiler found (c++, g++ or clang++ on PATH, or $CXX)")
    cmake = _tool("cmake")
    if cmake is None:
        raise _Unavailable("cmake not found (pip install cmake ninja, as requirements.txt does)")
    ninja = _tool("ninja")
    os.makedirs(target_dir, exist_ok=True)
    t0 = time.perf_counter()
    print(f"kernels.native: building the native CPU extension once into {target_dir} ...", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target_dir) as tmp, \
            open(os.path.join(target_dir, "build.log"), "w") as log:
        configure = [cmake, "-S", _ROOT, "-B", tmp, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}"]
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _run(configure, tmp, log)
        _run([cmake, "--build", tmp, "--parallel", str(max(1, os.cpu_count() or 1))], tmp, log)
        partial = os.path.join(target_dir, f".{_LIB}.{os.getpid()}.tmp")
        shutil.copyfile(os.path.join(tmp, _LIB), partial)
        os.replace(partial, os.path.join(target_dir, _LIB))
    seconds = time.perf_counter() - t0
    print(f"kernels.native: built in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def _load():
    if sys.platform != "linux":
        raise _Unavailable(f"the native build supports Linux only (this is {sys.platform})")
    import fcntl
    if not os.path.exists(os.path.join(_ROOT, "CMakeLists.txt")):
        raise _Unavailable(f"the C++ sources are not there ({_ROOT}/CMakeLists.txt is missing; install the "
                           f"repository with pip install -e .)")
    target = os.path.join(cache_root(), cache_key())
    lib = os.path.join(target, _LIB)
    if not os.path.exists(lib):
        try:
            os.makedirs(cache_root(), exist_ok=True)
        except OSError as e:
            raise _Unavailable(f"cannot create the cache directory {cache_root()} (${_ENV_CACHE}): "
                               f"{e.strerror}") from e
        with open(os.path.join(cache_root(), f"{os.path.basename(target)}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)               # another process may be building the same key
            if not os.path.exists(lib):
                _state["build_s"] = _build(target)
    try:
        torch.ops.load_library(lib)
    except (OSError, RuntimeError) as e:
        raise _Unavailable(f"loading {lib} failed: {e}") from e
    capability = torch.backends.cpu.get_cpu_capability()
    _state.update(loaded=True, path=lib, isa=torch.ops.llama_kernels.native_select_isa(capability))
    _register_fakes()


def _register_fakes():
    """Meta kernels: shapes and dtypes of the outputs, so the ops trace under torch.compile / FakeTensor."""
    lib = "llama_kernels::"

    @torch.library.register_fake(lib + "native_sr_bf16")
    def _(x, key):
        return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)

    @torch.library.register_fake(lib + "native_adamw_sr_")
    def _(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bc1, bc2, key):
        return None

    @torch.library.register_fake(lib + "native_rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1],
                                                                                      dtype=torch.float32)

    @torch.library.register_fake(lib + "native_rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)

    @torch.library.register_fake(lib + "native_swiglu_fwd")
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "native_swiglu_bwd")
    def _(dout, gate, up):
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(up, memory_format=torch.contiguous_format))


# --------------------------------------------------------------------------- differentiable wrappers

_DTYPES = (torch.float32, torch.bfloat16)


def supports(*tensors) -> bool:
    """Whether the native kernels take these tensors: CPU, float32 / bfloat16."""
    return all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.llama_kernels.native_rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.llama_kernels.native_rms_norm_bwd(dy.to(x.dtype), x, weight, rstd)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.ops.llama_kernels.native_swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return torch.ops.llama_kernels.native_swiglu_bwd(dout.to(gate.dtype), gate, up)


def rms_norm(x, weight, eps: float):
    """kernels.reference.rms_norm_ref's y, differentiable (backward: rms_norm_bwd_ref's numerics)."""
    return _RMSNorm.apply(x, weight, float(eps))


def swiglu(gate, up):
    """kernels.reference.swiglu_ref, differentiable (backward: swiglu_bwd_ref's numerics)."""
    return _SwiGLU.apply(gate, up)


__all__ = ["MODES", "available", "cache_key", "cache_root", "enabled", "get_mode", "info", "rms_norm",
           "set_mode", "supports", "swiglu", "unavailable_reason", "use_mode"]
