"""Run metrics: ``metrics.jsonl``, TensorBoard scalars, MFU, and the loss-curve PNG.

MFU = achieved model FLOP/s / peak FLOP/s of the devices used. Model FLOPs per token come from
``LlamaConfig.flops_per_token(seq_len)`` (6 N + attention, PaLM appendix B convention; activation recompute is
not counted, so this is MFU, not HFU). Peak per device:
- trn1 (XLA): 95 TFLOPS bf16 per NeuronCore-v2 = 3,040 per trn1.32xlarge (32 cores; AWS Trainium spec:
  190 bf16 TFLOPS per chip of 2 cores), the figure NxD Training's llama_perf_estimate uses per node.
- CUDA: a table of dense bf16 peaks by device name (A100 312, H100 SXM 989, H100 PCIe 756, L4 121, A10G 70);
  unknown GPUs need ``--peak-tflops``.
- CPU: no vendor figure applies, so it is *measured* at start-up for the dtype the matmuls actually compute in
  (``training.precision.matmul_plan``: fp32 for fp32 and widened bf16-sr, bf16 for native bf16-sr and mixed): the
  best of several warmed-up 512^3 GEMMs on this process's threads in both layouts the model runs (``a @ b`` and
  F.linear's ``a @ b.t()``; ``precision.matmul_gflops``). An estimate,
  stated as such in the summary; ``--peak-tflops`` overrides it.
MFU <= 100% by construction (``Peak``): an achieved rate above the peak means the peak was an underestimate (a
measurement disturbed by other load, a wrong ``--peak-tflops``), so the peak is raised to that rate and the
summary says so.
"""
from __future__ import annotations

import json
import math
import os
import threading

import torch

TRN1_CORE_TFLOPS_BF16 = 95.0
# Dense (no sparsity) peaks from the vendor datasheets, TFLOPS: (bf16 tensor, tf32 tensor, fp32 non-tensor).
# H200: NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1,979 / TF32 989 "with sparsity", i.e. 989 / 494 dense,
# FP32 67), the same GH100 compute as H100 SXM. A10G: AWS publishes no figure; the A10-class bf16 value in use here.
GPU_PEAK_TFLOPS = {"A100": (312.0, 156.0, 19.5), "H100 PCIe": (756.0, 378.0, 51.2), "H100": (989.0, 494.0, 67.0),
                   "H200": (989.0, 494.0, 67.0), "L4": (121.0, 60.0, 30.3), "A10G": (70.0, 35.0, 31.2),
                   "L40S": (362.0, 183.0, 91.6)}


def measure_cpu_tflops(dtype=torch.float32, n: int = 512, trials: int = 5) -> float:
    """The faster of the two GEMM layouts the model runs (``a @ b``, and ``a @ b.t()`` as in F.linear): a peak
    probed in one layout only undershot the model's bf16 rate on an AVX2-only fallback (9 GFLOP/s "peak",
    MFU pinned near 100% by the raise)."""
    from training.precision import matmul_gflops
    return max(matmul_gflops(dtype, n=n, trials=trials, min_time=0.05, layout=lay) for lay in ("nn", "nt")) / 1e3


def peak_tflops(device_type: str, dtype, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOPS per device, how it was obtained)."""
    if override:
        return float(override), "--peak-tflops"
    if device_type == "xla":
        return TRN1_CORE_TFLOPS_BF16, "trn1 NeuronCore-v2 bf16 peak (3,040 TFLOPS per trn1.32xlarge / 32)"
    if device_type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(), dtype, torch.backends.cuda.matmul.allow_tf32)
    v = measure_cpu_tflops(dtype)
    return v, f"measured CPU {str(dtype).replace('torch.', '')} matmul peak at start-up (estimate)"


def gpu_peak_tflops(name: str, dtype, allow_tf32: bool) -> tuple[float, str]:
    """Datasheet dense peak of the GPU ``name`` for matmuls in ``dtype`` (fp32 runs on TF32 tensor cores only
    when torch allows it)."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            bf16, tf32, fp32 = GPU_PEAK_TFLOPS[key]
            if dtype in (torch.bfloat16, torch.float16):
                return bf16, f"dense bf16 tensor-core peak of {key} (vendor datasheet)"
            if allow_tf32:
                return tf32, f"dense tf32 tensor-core peak of {key} (vendor datasheet; fp32 matmuls allowed tf32)"
            return fp32, f"fp32 (non-tensor-core) peak of {key} (vendor datasheet)"
    raise ValueError(f"no peak-FLOPS entry for GPU {name!r}; pass --peak-tflops")


class Peak:
    """Peak TFLOPS per device for MFU, never below a rate achieved in this run: ``mfu`` is <= 1 by construction."""

    def __init__(self, tflops: float, source: str):
        if not (math.isfinite(tflops) and tflops > 0):
            raise ValueError(f"peak TFLOPS must be a finite number > 0, got {tflops!r} ({source})")
        self.tflops, self._source, self.raised = float(tflops), source, False

    def mfu(self, achieved_tflops: float) -> float:
        """achieved / peak, the peak first raised to ``achieved`` if below it; NaN for a non-finite rate."""
        if not math.isfinite(achieved_tflops) or achieved_tflops < 0:
            return float("nan")
        if achieved_tflops > self.tflops:
            self.tflops, self.raised = achieved_tflops, True
        return achieved_tflops / self.tflops

    @property
    def source(self) -> str:
        if not self.raised:
            return self._source
        return f"{self._source}, raised to the best achieved rate (the stated peak was below it)"


def json_safe(value):
    """A metric value for strict JSON: non-finite floats become None (NaN/Infinity are not JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Rank 0 only. ``log(step, **scalars)`` appends a JSON line and TensorBoard scalars."""

    def __init__(self, out_dir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.records = []
        if resume_step is not None and os.path.exists(self.path):
            # Entries logged after the resumed checkpoint belong to the lost tail of the run: drop them so the file
            # stays one consistent history (rewritten through a temporary name).
            with open(self.path) as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue               # a line cut by a kill
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                for rec in self.records:
                    fh.write(json.dumps({k: json_safe(v) for k, v in rec.items()}, allow_nan=False) + "\n")
            os.replace(tmp, self.path)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.fh = open(self.path, "a")
        self.tb = None
        if tensorboard:
            _quiet_tensorboard_thread_errors()
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, **scalars):
        # Strict JSON: a skipped step's NaN loss / grad norm is written as null (its ``skipped`` flag says why).
        rec = {"step": step, **{k: json_safe(v) for k, v in scalars.items()}}
        self.records.append(rec)
        self.fh.write(json.dumps(rec, allow_nan=False) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self):
        self.fh.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _quiet_tensorboard_thread_errors():
    """TensorBoard writes events from a background thread that re-raises a write error there (a full traceback on
    stderr) and again on the next add_scalar / flush in the caller's thread. Keep only the second: the trainer
    reports that one in a single line."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    previous = threading.excepthook
    if getattr(previous, "_quiet_tb", False):
        return

    def hook(args):
        if isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError):
            return
        previous(args)
    hook._quiet_tb = True
    threading.excepthook = hook


def read_metrics(path: str) -> list[dict]:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
