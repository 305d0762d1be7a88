"""One import point for kernel modules: ``from kernels.nki_compat import nki, nl, nisa, BACKEND``.

BACKEND is "nki" when the real NKI package (``import nki``, NKI >= 0.3, on a Neuron host) is importable, else
"sim" (our CPU interpreter, :mod:`kernels.sim`). Environment ``LLAMA_KERNELS_NKI``: "" (auto), "sim" (force the
interpreter even where the real package exists), "nki" (require the real package; ImportError otherwise).
The interpreter is never registered as the top-level ``nki`` module here, so a real installation is never shadowed.
"""
import importlib
import importlib.util
import os
import sys


def _real_nki_available():
    mod = sys.modules.get("nki")
    if mod is not None:
        return not getattr(mod, "_SIMULATED", False)
    try:
        spec = importlib.util.find_spec("nki")
    except (ImportError, ValueError):
        return False
    return spec is not None


_choice = os.environ.get("LLAMA_KERNELS_NKI", "").strip().lower()
if _choice not in ("", "sim", "nki"):
    raise ValueError(f"LLAMA_KERNELS_NKI={_choice!r}: expected '', 'sim' or 'nki'")

if _choice == "sim" or (_choice == "" and not _real_nki_available()):
    from kernels.sim import nki, nl, nisa  # noqa: F401
    BACKEND = "sim"
else:
    if not _real_nki_available():
        raise ImportError("LLAMA_KERNELS_NKI=nki but the real 'nki' package (Neuron SDK >= 2.29) is not installed")
    nki = importlib.import_module("nki")
    nl = importlib.import_module("nki.language")
    nisa = importlib.import_module("nki.isa")
    BACKEND = "nki"

# The kernels target the NKI >= 0.3 API (Neuron SDK >= 2.29: dst-first nisa calls, shared_hbm outputs,
# nc_matmul(accumulate=)). The interpreter reports "0.6.0+sim".
NKI_VERSION = str(getattr(nki, "__version__", "unknown"))

__all__ = ["nki", "nl", "nisa", "BACKEND", "NKI_VERSION"]
