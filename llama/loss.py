"""The training loss of an unsharded model: LM head projection fused with token cross-entropy.

``LinearCrossEntropy(hidden [B,S,H], weight [V,H], labels [B,S])`` equals
``F.cross_entropy(F.linear(hidden, weight).float().view(-1, V), labels.view(-1), ignore_index=-100)`` but
never holds the full [B*S, V] logits: rows are processed in chunks of about ``chunk_elems`` logits, and
each chunk's gradient (softmax - onehot) is turned into dHidden and dWeight right away in the forward
(the idea of Liger-Kernel's fused linear cross-entropy; written here for plain PyTorch on CPU / XLA).
The backward only scales the stored gradients by the incoming scalar. With a vocabulary of 32000 this
removes three [B*S, V] fp32 buffers (logits, log-softmax, its gradient) and the log-softmax backward pass.

Numerics: logits computed in the dtype F.linear would use (the weight's; under autocast the autocast dtype,
fp64 excepted) and upcast to fp32 (fp64 stays fp64); log-softmax (max, exp, sum, log) in fp32 in one fused pass,
softmax gradient = exp(log-softmax) - onehot in fp32. The gradient matmuls run with autocast off:
dWeight = sum over chunks of grad^T @ hidden in fp32, cast once to the weight's dtype; dHidden per chunk =
grad cast to the weight's dtype @ weight. Ignored tokens (label == -100) contribute 0 to the loss and 0 to
every gradient. Rows are split into equal chunks of at most chunk_elems // V rows (at least one).

Under a torch function mode that widens bf16 matmuls (one with ``widens_bf16_matmuls = True``: training.precision's
WidenedBf16Matmuls, the bf16-sr path of CPUs without bf16 matrix units) the bf16 case keeps the numerics above
with fp32 GEMMs written straight into the fp32 chunk buffer: logits = fp32 GEMM of the exact fp32 widenings,
rounded to bf16 in place (RNE, what the widened bf16 F.linear returns before the upcast); dHidden = the fp32 GEMM
of the gradient rounded to bf16 in place and the widened weight, rounded once to bf16. No bf16 copy of a
[rows, V] buffer is made (issue 15: four V-wide casts per chunk were a third of the default run's extra time).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

IGNORE_INDEX = -100


def _widened_bf16_matmuls() -> bool:
    """Whether an active torch function mode computes bf16 matmuls in fp32 (declares ``widens_bf16_matmuls``)."""
    try:
        from torch.overrides import _get_current_function_mode_stack
        modes = _get_current_function_mode_stack()
    except (ImportError, RuntimeError):
        return False
    return any(getattr(m, "widens_bf16_matmuls", False) for m in modes)


def _round_bf16_(z: torch.Tensor) -> torch.Tensor:
    """Round an fp32 tensor in place to the nearest bf16 values (RNE, as ``z.to(torch.bfloat16)``)."""
    return z.copy_(z.to(torch.bfloat16))


def _autocast_dtype(device_type: str):
    """The autocast dtype active for this device type, or None (autocast off, or a device type such as
    ``meta`` that autocast does not know)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def _chunk_rows(n: int, v: int, chunk_elems: int) -> int:
    """Rows per chunk: equal chunks of at most chunk_elems // V rows (1024 rows -> 4 x 256, not 3 x 262 + 238);
    1 when there are no rows."""
    if not n:
        return 1
    return math.ceil(n / math.ceil(n / max(1, min(n, chunk_elems // v))))


class _Gemms:
    """The three GEMM paths of one call: ``direct`` (all operands already in the accumulation dtype: the matmuls
    write into the buffers), ``widened`` (bf16 under a widening mode: fp32 GEMMs, bf16 roundings in place) or
    cast (operands cast to the compute dtype ``mm``, results copied into the accumulation-dtype buffer)."""

    def __init__(self, hidden, weight, mm, acc):
        self.weight, self.mm, self.acc = weight, mm, acc
        self.direct = mm == acc and hidden.dtype == acc and weight.dtype == acc
        self.widened = mm == torch.bfloat16 and acc == torch.float32 and _widened_bf16_matmuls()
        self.w_mm = weight.to(torch.float32 if self.widened else mm)        # one cast per step under autocast
        # The logits matmul's [H, V] operand is laid out per dtype. fp32/fp64: a contiguous copy, which beat
        # MKL's transposed-B sgemm on x @ W.t() by a few percent in the full model step (bench_kernels/model.py,
        # issue 4). bf16/fp16: the transposed view F.linear passes: on a CPU without bf16 matrix units PyTorch's
        # fallback GEMM runs it as dot products over contiguous H, 5.7x faster than the contiguous copy at
        # 1024 x 64 x 2048 (121 vs 691 ms, AMD EPYC family 23 AVX2, issue 15); oneDNN and cuBLAS take either.
        w = self.w_mm
        self.w_t = w.t().contiguous() if w.dtype in (torch.float32, torch.float64) else w.t()

    def logits_into(self, z, x):
        """z [rows, V] (accumulation dtype) <- the logits of x, as F.linear in the compute dtype, upcast."""
        if self.direct:
            torch.mm(x, self.w_t, out=z)
        elif self.widened:
            _round_bf16_(torch.mm(x.to(torch.float32), self.w_t, out=z))   # = bf16 logits, upcast
        else:
            z.copy_(x.to(self.mm) @ self.w_t)

    def dhidden_into(self, out, z, keep):
        """out [rows, H] <- softmax gradient z @ weight (z rounded to the weight's dtype first), ignored rows 0."""
        if self.direct:
            torch.mm(z, self.weight, out=out).mul_(keep)
        elif self.widened:
            out[...] = torch.mm(_round_bf16_(z), self.w_mm).mul_(keep)     # one rounding to bf16
        else:
            out[...] = (z.to(self.weight.dtype) @ self.weight) * keep


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_elems):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        flat = labels.reshape(-1)
        n, v = h2.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)     # fp32 (fp64 for fp64 weights)
        dev = hidden.device
        amp = _autocast_dtype(dev.type)
        # The logits matmul runs in the dtype F.linear would use: autocast's (which leaves fp64 alone) or the
        # weight's. Everything below runs with autocast off and states its dtypes (gradient matmuls as
        # documented above; out= is not allowed under autocast).
        mm = amp if amp is not None and weight.dtype != torch.float64 else weight.dtype
        with torch.autocast(dev.type, enabled=False) if amp is not None else contextlib.nullcontext():
            gemms = _Gemms(hidden, weight, mm, acc)
            dh = torch.empty_like(h2) if need_h else None
            dw = None          # created by the first chunk's matmul (no zero fill of a [V, H] buffer)
            total = torch.zeros((), dtype=acc, device=dev)
            # One [rows, V] buffer in the accumulation dtype, reused by every chunk, receives the logits, then in
            # place the log-softmax and the softmax gradient: no fresh V-wide allocation per chunk.
            rows = _chunk_rows(n, v, chunk_elems)
            buf = torch.empty((rows, v), dtype=acc, device=dev)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                x, lbl = h2[r0:r1], flat[r0:r1]
                valid = lbl != ignore_index
                idx = lbl.masked_fill(~valid, 0).unsqueeze(1)
                z = buf[:r1 - r0]
                gemms.logits_into(z, x)
                torch.log_softmax(z, dim=-1, out=z)                       # one fused pass in fp32, in place
                total -= (z.gather(1, idx).squeeze(1) * valid).sum()
                if not (need_h or need_w):
                    continue
                z.exp_()                                                  # softmax
                z.scatter_add_(1, idx, -valid.to(z.dtype).unsqueeze(1))   # - onehot(target)
                # Ignored rows are zeroed on the [rows, H] side (x for dWeight, dHidden after the matmul), not
                # on the [rows, V] gradient: a pass over H-wide rows instead of V-wide ones.
                keep = valid.unsqueeze(1)
                if need_w:                                                # first: the widened dHidden rounds z
                    xk = x.to(acc) * keep
                    dw = z.t() @ xk if dw is None else dw.addmm_(z.t(), xk)
                if need_h:
                    gemms.dhidden_into(dh[r0:r1], z, keep)
            if need_w and dw is None:                               # no rows at all
                dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ctx.save_for_backward(dh if need_h else None, dw if need_w else None)
        ctx.shape, ctx.wdtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        gh = None if dh is None else (dh * g.to(dh.dtype)).view(ctx.shape)
        gw = None if dw is None else (dw * g).to(ctx.wdtype)
        return gh, gw, None, None, None


class LinearCrossEntropy(nn.Module):
    """loss_fn(hidden, weight, labels, reduction): LM head + cross-entropy ("mean" over valid tokens, or "sum")."""

    ignore_index = IGNORE_INDEX

    def __init__(self, chunk_elems: int = 1 << 23):
        super().__init__()
        self.chunk_elems = chunk_elems

    def forward(self, hidden, weight, labels, reduction="mean"):
        total = _LinearCE.apply(hidden, weight, labels, self.ignore_index, self.chunk_elems)
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / (labels != self.ignore_index).sum()
        raise ValueError(f"LinearCrossEntropy: reduction must be 'mean' or 'sum', got {reduction!r}")
