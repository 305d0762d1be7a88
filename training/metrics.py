"""Run metrics: ``metrics.jsonl``, TensorBoard scalars, MFU, and the loss-curve PNG.

MFU = achieved model FLOP/s / peak FLOP/s of the devices used. Model FLOPs per token come from
``LlamaConfig.flops_per_token(seq_len)`` (6 N + attention, PaLM appendix B convention; activation recompute is
not counted, so this is MFU, not HFU). Peak per device:
- trn1 (XLA): 95 TFLOPS bf16 per NeuronCore-v2 = 3,040 per trn1.32xlarge (32 cores; AWS Trainium spec:
  190 bf16 TFLOPS per chip of 2 cores), the figure NxD Training's llama_perf_estimate uses per node.
- CUDA: a table of dense bf16 peaks by device name (A100 312, H100 SXM 989, H100 PCIe 756, L4 121, A10G 70);
  unknown GPUs need ``--peak-tflops``.
- CPU: no vendor figure applies, so it is *measured* at start-up: the best of a few 512x512x512 matmuls in the
  parameter dtype on this process's threads. An estimate, stated as such in the summary; ``--peak-tflops``
  overrides it.
"""
from __future__ import annotations

import json
import os
import time

import torch

TRN1_CORE_TFLOPS_BF16 = 95.0
GPU_BF16_TFLOPS = {"A100": 312.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "L4": 121.0, "A10G": 70.0,
                   "L40S": 362.0}


def measure_cpu_tflops(dtype=torch.float32, n: int = 512, reps: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device_type: str, dtype, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOPS per device, how it was obtained)."""
    if override:
        return float(override), "--peak-tflops"
    if device_type == "xla":
        return TRN1_CORE_TFLOPS_BF16, "trn1 NeuronCore-v2 bf16 peak (3,040 TFLOPS per trn1.32xlarge / 32)"
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key in sorted(GPU_BF16_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_BF16_TFLOPS[key], f"dense bf16 peak of {key} (vendor datasheet)"
        raise ValueError(f"no peak-FLOPS entry for GPU {name!r}; pass --peak-tflops")
    v = measure_cpu_tflops(dtype)
    return v, f"measured CPU {str(dtype).replace('torch.', '')} matmul peak at start-up (estimate)"


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
                    fh.write(json.dumps(rec) + "\n")
            os.replace(tmp, self.path)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.fh = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, **scalars):
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                for k, v in scalars.items()}}
        self.records.append(rec)
        self.fh.write(json.dumps(rec) + "\n")
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
