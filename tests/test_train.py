"""``python train.py`` end to end on CPU: the default run, metrics/TensorBoard/plot outputs, the NaN guard and the
bad-input errors. Resume and kills: test_train_resume.py; parity and parallelism: test_train_parity.py,
test_train_parallel.py. Runs are subprocesses with one thread and tiny shapes (seq 32, batch 8)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seq-len", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--threads", "1",
         "--no-progress"]


def train(*args, env=None, check=True, timeout=240):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "fp32")
    p = train("--precision", "fp32", "--max-steps", 8, "--checkpoint-every", 4, "--out-dir", out, *SMALL)
    return out, p


def test_default_config_runs_and_loss_falls(tmp_path):
    # The real default (tiny preset, embedded corpus, seq 128, batch 16, bf16-sr); only fewer steps than its 250.
    out = str(tmp_path / "default")
    p = train("--max-steps", 12, "--out-dir", out, "--threads", "2")
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "param_norm", "tokens_per_s", "sequences_per_s", "mfu"):
        assert all(isinstance(r[key], float) for r in recs), key
    first = recs[0]["loss"]
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert "train.py summary" in p.stdout and out in p.stdout and "MFU" in p.stdout
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    events = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert len(tb_loss) == 12 and abs(tb_loss[-1] - recs[-1]["loss"]) < 1e-5


def test_outputs_and_checkpoints(small_run):
    out, p = small_run
    recs = metrics(out)
    assert len(recs) == 8
    from training.checkpoint import list_checkpoints, read_meta
    ck = list_checkpoints(out)
    assert [s for s, _ in ck] == [4, 8]
    meta = read_meta(ck[-1][1])
    assert meta["step"] == 8 and meta["precision"] == "fp32" and list(meta["files"]) == ["rank_tp0_dp0.pt"]
    # param_norm of the last step = the L2 norm of the weights that step's checkpoint holds (float64 here)
    import torch
    weights = torch.load(os.path.join(ck[-1][1], "rank_tp0_dp0.pt"), weights_only=False)["model"]
    norm = sum(w.double().pow(2).sum() for w in weights.values()).sqrt().item()
    assert abs(recs[-1]["param_norm"] - norm) <= 1e-5 * norm, (recs[-1]["param_norm"], norm)
    for r in recs:
        assert r["sequences_per_s"] == pytest.approx(r["tokens_per_s"] / 32, rel=1e-12)


def test_plot_command_draws_several_runs(small_run, tmp_path):
    out, _ = small_run
    fig = str(tmp_path / "fig.png")
    p = subprocess.run([sys.executable, "-m", "training.plot", out, out, "-o", fig, "--labels", "a", "b"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(fig) > 1000


def test_nan_guard_skips_and_counts(tmp_path):
    out = str(tmp_path / "nan")
    train("--precision", "fp32", "--max-steps", 6, "--out-dir", out, *SMALL, env={"LLAMA_TRAIN_FAULT_NAN_STEPS": "3"})
    recs = metrics(out)
    assert [r["skipped"] for r in recs] == [0, 0, 1, 0, 0, 0]
    assert recs[-1]["skipped_total"] == 1
    assert recs[2]["lr"] == recs[1]["lr"]                 # the schedule did not advance on the skipped step


def test_nan_guard_stops_with_last_good_checkpoint_intact(tmp_path):
    out = str(tmp_path / "nan_stop")
    p = train("--precision", "fp32", "--max-steps", 10, "--checkpoint-every", 2, "--nan-guard-max-consecutive", 3,
              "--out-dir", out, *SMALL, env={"LLAMA_TRAIN_FAULT_NAN_STEPS": "5,6,7"}, check=False)
    assert p.returncode == 3, p.stderr
    assert "3 consecutive steps with a non-finite gradient norm" in p.stderr
    from training.checkpoint import latest_checkpoint, read_meta
    assert read_meta(latest_checkpoint(out))["step"] == 4


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def train_inproc(capsys, *args):
    """train.main in this process (the bad-input paths stop before any training, so no subprocess is needed)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import train as train_script
    capsys.readouterr()
    try:
        code = train_script.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def _err(p):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    return p.stderr


def test_bad_batch_sizes(capsys, tmp_path):
    err = _err(train_inproc(capsys, "--global-batch-size", 10, "--micro-batch-size", 4, "--out-dir", tmp_path / "b"))
    assert "global_batch_size 10 is not a multiple of micro_batch_size 4" in err
    assert not os.path.exists(tmp_path / "b")


def test_nki_backend_without_the_neuron_sdk(capsys, tmp_path):
    from kernels import nki_compat
    if nki_compat.BACKEND == "nki":
        pytest.skip("the real NKI package is installed here: backend nki is available")
    err = _err(train_inproc(capsys, "--kernels", "nki", "--out-dir", tmp_path / "b", *SMALL))
    assert "--kernels nki" in err and "needs the real NKI package" in err
    assert not os.path.exists(tmp_path / "b")


def test_bad_init_from_hf(capsys, tmp_path):
    err = _err(train_inproc(capsys, "--init-from-hf", tmp_path / "none", "--out-dir", tmp_path / "a", *SMALL))
    assert "no config file" in err and str(tmp_path / "none") in err
    assert not os.path.exists(tmp_path / "a")
    # a checkpoint whose weights are missing: the model build fails with the file named, not a traceback
    import torch

    import llama
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    llama.to_hf(llama.Llama(llama.LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1,
                                              num_heads=2, num_kv_heads=2, max_seq_len=64)), hf)
    for f in glob.glob(str(hf / "*.safetensors")):
        os.remove(f)
    res = train_inproc(capsys, "--init-from-hf", hf, "--out-dir", tmp_path / "b", *SMALL)
    assert res.returncode != 0 and "model: " in res.stderr and str(hf) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_bad_toml_key(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\nlr = 1e-3\nlearning_rate = 3\n')
    err = _err(train_inproc(capsys, "--config", cfg, "--out-dir", tmp_path / "b"))
    assert "unknown key 'learning_rate'" in err and str(cfg) in err


def test_out_dir_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _err(train_inproc(capsys, "--out-dir", blocker / "run", *SMALL))
    assert "is not writable" in err


def test_existing_run_is_not_overwritten(capsys, small_run):
    out, _ = small_run
    before = open(os.path.join(out, "metrics.jsonl")).read()
    err = _err(train_inproc(capsys, "--precision", "fp32", "--max-steps", 2, "--out-dir", out, *SMALL))
    assert "already holds a run" in err
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_resume_without_checkpoint(capsys, tmp_path):
    err = _err(train_inproc(capsys, "--resume", "--out-dir", tmp_path / "empty", *SMALL))
    assert "no checkpoint" in err


def test_resume_config_mismatch(capsys, small_run, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(small_run[0], out)
    err = _err(train_inproc(capsys, "--precision", "fp32", "--max-steps", 10, "--resume", "--out-dir", out,
                            "--seq-len", "16", *SMALL[2:]))
    assert "another configuration" in err and "seq_len" in err
    err = _err(train_inproc(capsys, "--precision", "bf16-sr", "--max-steps", 10, "--resume", "--out-dir", out, *SMALL))
    assert "precision" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_meta"])
def test_resume_corrupt_checkpoint(capsys, small_run, tmp_path, damage):
    out = str(tmp_path / "copy")
    shutil.copytree(small_run[0], out)
    last = os.path.join(out, "checkpoints", "step_000008")
    f = os.path.join(last, "rank_tp0_dp0.pt")
    if damage == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(100)
    elif damage == "garbage":
        size = os.path.getsize(f)
        with open(f, "wb") as fh:
            fh.write(b"\x00" * size)
    else:
        os.remove(os.path.join(last, "meta.json"))
    err = _err(train_inproc(capsys, "--precision", "fp32", "--max-steps", 10, "--resume", "--out-dir", out, *SMALL))
    assert last in err
    assert {"truncate": "truncated", "garbage": "corrupt", "no_meta": "incomplete"}[damage] in err


def test_presets_and_toml_overrides(tmp_path):
    from training.config import TrainConfigError, load_config
    c7 = load_config("llama2-7b")
    assert (c7.tp, c7.seq_len, c7.lr, c7.beta2, c7.weight_decay, c7.grad_clip, c7.min_lr_ratio) == \
        (8, 4096, 3e-4, 0.95, 0.1, 1.0, 0.1)
    assert c7.model_config().hidden_size == 4096 and load_config("llama2-70b").model_config().num_kv_heads == 8
    assert c7.derive(32) == {"dp": 4, "grad_accum": 64}
    with pytest.raises(TrainConfigError, match="not divisible by micro_batch_size 1 x dp 3"):
        c7.derive(24)
    f = tmp_path / "m.toml"
    f.write_text('preset = "tiny"\nseq_len = 64\n[model_overrides]\nnum_layers = 3\n')
    c = load_config(str(f), {"lr": 1e-4, "seed": None})
    assert (c.seq_len, c.lr, c.model_config().num_layers, c.model_config().vocab_size) == (64, 1e-4, 3, 2048)
    f.write_text('[model_overrides]\nlayers = 3\n')
    with pytest.raises(TrainConfigError, match=r"unknown model field\(s\) \['layers'\]"):
        load_config(str(f))
    with pytest.raises(TrainConfigError, match="neither a preset"):
        load_config("llama3")
