"""The training loss of an unsharded model: LM head projection fused with token cross-entropy.

``LinearCrossEntropy(hidden [B,S,H], weight [V,H], labels [B,S])`` equals
``F.cross_entropy(F.linear(hidden, weight).float().view(-1, V), labels.view(-1), ignore_index=-100)`` but
never holds the full [B*S, V] logits: rows are processed in chunks of about ``chunk_elems`` logits, and
each chunk's gradient (softmax - onehot) is turned into dHidden and dWeight right away in the forward
(the idea of Liger-Kernel's fused linear cross-entropy; written here for plain PyTorch on CPU / XLA).
The backward only scales the stored gradients by the incoming scalar. With a vocabulary of 32000 this
removes three [B*S, V] fp32 buffers (logits, log-softmax, its gradient) and the log-softmax backward pass.

Numerics: logits computed in the weight's dtype and upcast to fp32 (as F.linear then .float(); fp64 stays
fp64); max, exp, sum and log in fp32; dWeight accumulated over chunks in fp32 and cast once to the weight's dtype;
dHidden per chunk from the fp32 softmax gradient cast to the weight's dtype for the matmul.
Ignored tokens (label == -100) contribute 0 to the loss and 0 to every gradient.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_elems):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        flat = labels.reshape(-1)
        n, v = h2.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h2) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)     # fp32 (fp64 for fp64 weights)
        dw = None              # created by the first chunk's matmul (no zero fill of a [V, H] buffer)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        rows = max(1, min(n, chunk_elems // v))
        # The logits matmul reads the weight as a contiguous [H, V] copy: with V in the thousands, MKL's sgemm on
        # x @ W.t() (transposed B) ran 1.4x slower than on x @ W_T on this CPU (bench_kernels/model.py), and the
        # copy costs one pass over the weight per step. One fp32 [rows, V] buffer, reused by every chunk, holds
        # the log-softmax and then, in place, the softmax gradient.
        w_t = weight.t().contiguous()
        buf = torch.empty((rows, v), dtype=acc, device=hidden.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            x = h2[r0:r1]
            lbl = flat[r0:r1]
            valid = lbl != ignore_index
            idx = lbl.masked_fill(~valid, 0).unsqueeze(1)
            # one fused log-softmax pass (max, exp, sum, log in fp32) instead of separate amax/sub/exp/sum
            z = torch.log_softmax((x @ w_t).to(acc), dim=-1, out=buf[:r1 - r0])
            total -= (z.gather(1, idx).squeeze(1) * valid).sum()
            if need_h or need_w:
                z.exp_()                                                  # softmax
                z.scatter_add_(1, idx, -valid.to(z.dtype).unsqueeze(1))   # - onehot(target)
                # Ignored rows are zeroed on the [rows, H] side (x for dWeight, dHidden after the matmul), not
                # on the [rows, V] gradient: a pass over H-wide rows instead of V-wide ones.
                keep = valid.unsqueeze(1)
                g = z.to(weight.dtype)
                if need_h:
                    dh[r0:r1] = (g @ weight) * keep
                if need_w:
                    xk = x.to(acc) * keep
                    if dw is None:
                        dw = z.t() @ xk
                    else:
                        dw.addmm_(z.t(), xk)
        if need_w and dw is None:                                   # no rows at all
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
