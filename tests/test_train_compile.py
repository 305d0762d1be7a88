"""``train.py --compile`` (torch.compile of the whole model, CPU): same losses as eager within fp32 reassociation
error, exact resume under compile, and a clear error when no C++ compiler is there for inductor."""
import os

from test_train import SMALL, metrics, train

STEPS = ["--precision", "fp32", "--checkpoint-every", "2", *SMALL]


def test_compile_matches_eager_and_resumes_exactly(tmp_path):
    eager, comp, part = (str(tmp_path / n) for n in ("eager", "compiled", "part"))
    train("--max-steps", 4, "--out-dir", eager, *STEPS)
    train("--max-steps", 4, "--out-dir", comp, "--compile", *STEPS, timeout=600)
    e, c = metrics(eager), metrics(comp)
    assert [r["step"] for r in c] == [1, 2, 3, 4]
    for re, rc in zip(e, c):
        # Fused kernels reassociate fp32 sums (RMSNorm statistics, softmax): agreement to ~1e-6, not bitwise.
        assert abs(rc["loss"] - re["loss"]) <= 1e-5 * abs(re["loss"]), (re["loss"], rc["loss"])
        assert abs(rc["grad_norm"] - re["grad_norm"]) <= 1e-4 * re["grad_norm"], (re["grad_norm"], rc["grad_norm"])
    # An interrupted compiled run resumes to the uninterrupted compiled run's losses, bit for bit.
    train("--max-steps", 2, "--out-dir", part, "--compile", *STEPS, timeout=600)
    train("--max-steps", 4, "--out-dir", part, "--compile", "--resume", "--allow-hparam-change", *STEPS, timeout=600)
    assert [r["loss"] for r in metrics(part) if "loss" in r] == [r["loss"] for r in c]
    # the longer schedule was applied explicitly and recorded (warmup 20 > 4 steps: the lr values are unchanged)
    assert [r for r in metrics(part) if "event" in r] == [
        {"step": 2, "event": "hparams_changed", "changes": {"max_steps": {"checkpoint": 2, "now": 4}}}]


def test_compile_without_cxx_compiler_is_a_clear_error(tmp_path):
    p = train("--max-steps", 1, "--out-dir", str(tmp_path / "r"), "--compile", *STEPS,
              env={"CXX": "/nonexistent/g++"}, check=False)
    assert p.returncode != 0
    assert "C++ compiler" in p.stderr and "--compile" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")


def test_compile_cache_key_carries_the_aten_cpu_capability(monkeypatch):
    import torch.compiler.config as cc

    from training import compile_cache
    monkeypatch.setattr(cc, "cache_key_tag", "")
    assert compile_cache.tag_compile_cache_with_cpu_isa({}) == ""                   # no variable: torch's own key
    assert compile_cache.tag_compile_cache_with_cpu_isa({"ATEN_CPU_CAPABILITY": "AVX2"}) == "aten-cpu-avx2"
    assert compile_cache.tag_compile_cache_with_cpu_isa({"ATEN_CPU_CAPABILITY": "avx2"}) == "aten-cpu-avx2"   # once
    monkeypatch.setattr(cc, "cache_key_tag", "user")
    assert compile_cache.tag_compile_cache_with_cpu_isa({"ATEN_CPU_CAPABILITY": "avx512"}) == "user+aten-cpu-avx512"
    assert cc.cache_key_tag == "user+aten-cpu-avx512"


def test_compile_cache_shared_across_aten_cpu_capabilities(tmp_path, monkeypatch):
    """One inductor cache directory, a --compile run with the CPU's own ISA, then one with ATEN_CPU_CAPABILITY=avx2
    (the AVX2 emulation of issue 15): before the cache tag the second loaded the first's AVX512 kernels built as
    AVX2 ones and failed (out-of-bounds index in the loss / segfault); now both train to the same losses."""
    cache = str(tmp_path / "inductor")
    env = {"TORCHINDUCTOR_CACHE_DIR": cache}
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    runs = {}
    for name, extra in (("own", {}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2"})):
        out = str(tmp_path / name)
        p = train("--max-steps", 2, "--out-dir", out, "--compile", *STEPS, env=dict(env, **extra), check=False,
                  timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[name] = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(runs["own"]) == 2
    for a, b in zip(runs["own"], runs["avx2"]):
        assert abs(a - b) <= 1e-5 * abs(a), runs
