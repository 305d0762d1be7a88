"""kernels.sim.install_as_nki(): run a kernel written exactly as for the official simulator
(`import nki; import nki.language as nl; import nki.isa as nisa`, `nki.simulate(kernel)(...)`), and refuse
to shadow a real `nki` package. Each case runs in a subprocess so this process's sys.modules stays clean."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A user's script, official-simulator style (new API, NKI >= 0.3); only the first two lines are ours.
USER_SCRIPT = textwrap.dedent("""
    from kernels.sim import install_as_nki
    install_as_nki()

    import numpy as np
    import nki
    import nki.isa as nisa
    import nki.language as nl


    @nki.jit
    def gated_rowscale(x, w):
        # out = silu(x) * w (w broadcast to all rows on TensorE), norms = sum(out^2) per row; 128-row tiles
        n, d = x.shape
        out = nl.ndarray((n, d), dtype=x.dtype, buffer=nl.shared_hbm)
        norms = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        w_row = nl.ndarray((1, d), dtype=w.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_row, src=w)
        ones = nl.ndarray((1, 128), dtype=w.dtype, buffer=nl.sbuf)
        nisa.memset(dst=ones, value=1.0)
        w_ps = nl.ndarray((128, d), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=w_ps, stationary=ones, moving=w_row)
        w_b = nl.ndarray((128, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=w_b, src=w_ps)
        for r in range(0, n, 128):
            rows = min(128, n - r)
            xt = nl.ndarray((128, d), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=xt[0:rows], src=x[r:r + rows])
            sg = nl.ndarray((128, d), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=sg[0:rows], op=nl.silu, data=xt[0:rows])
            y = nl.ndarray((128, d), dtype=x.dtype, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=y[0:rows], data1=sg[0:rows], data2=w_b[0:rows], op=nl.multiply)
            sq = nl.ndarray((128, d), dtype=nl.float32, buffer=nl.sbuf)
            nr = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=sq[0:rows], op=nl.square, data=y[0:rows], reduce_op=nl.add,
                            reduce_res=nr[0:rows], reduce_cmd=nisa.reduce_cmd.reset_reduce)
            nisa.dma_copy(dst=out[r:r + rows], src=y[0:rows])
            nisa.dma_copy(dst=norms[r:r + rows], src=nr[0:rows])
        return out, norms


    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 96)).astype(np.float32)
    w = rng.standard_normal((1, 96)).astype(np.float32)
    out, norms = nki.simulate(gated_rowscale)(x, w)

    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 / (1.0 + np.exp(-x64)) * w64
    assert out.shape == (200, 96) and out.dtype == np.float32, (out.shape, out.dtype)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-6), np.abs(out - ref).max()
    assert np.allclose(norms[:, 0], (ref ** 2).sum(1), rtol=1e-4), np.abs(norms[:, 0] - (ref ** 2).sum(1)).max()
    assert "kernels" in nki.__name__ or "kernels" in getattr(nki, "__file__", ""), nki
    print("OK", float(np.abs(out - ref).max()))
""")


def _run(script, extra_path=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("NEURON_PLATFORM_TARGET_OVERRIDE", None)
    return subprocess.run([sys.executable, "-c", script], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=120)


def test_official_style_kernel_runs_through_install_as_nki():
    r = _run(USER_SCRIPT)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_refuses_when_a_real_nki_is_importable(tmp_path):
    fake = tmp_path / "nki"
    fake.mkdir()
    (fake / "__init__.py").write_text("FAKE_REAL_NKI = True\n")
    script = textwrap.dedent("""
        import sys
        from kernels.sim import install_as_nki
        try:
            install_as_nki()
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
        import nki
        print("NKI_IS_FAKE", getattr(nki, "FAKE_REAL_NKI", False))
    """)
    r = _run(script, extra_path=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout, r.stdout
    assert "NKI_IS_FAKE True" in r.stdout, r.stdout
