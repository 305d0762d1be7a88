"""AdamW (with a bf16 + stochastic-rounding variant), parameter groups, LR schedule, gradient clipping, NaN guard.

Weight decay: applied to every matrix (linears, embedding, LM head), not to the RMSNorm weights (1-D tensors),
as Llama / NeMo / Megatron do (they also exempt biases; this Llama has none).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kernels import native
from training.precision import SHARED_STREAM, sharded_stream, sr_tensor_key, stochastic_round_bf16


class SRAdamW(torch.optim.Optimizer):
    """AdamW for bf16 parameters: exp_avg / exp_avg_sq in fp32, the update computed in fp32 from the upcast bf16
    parameter and gradient, the result written back with stochastic rounding (``hardware_sr=True``: a plain
    cast, for XLA where the Neuron runtime rounds stochastically).

    Each param group carries ``sr_stream`` (see training.precision) and ``sr_step`` (optimizer steps taken, saved
    with the optimizer's state_dict); the rounding bits of the group's i-th parameter at a step are the counter
    bits ``sr_bits(sr_tensor_key(seed, sr_step, sr_stream, i))`` (training.precision), so a step's result does
    not depend on threads and TP replicas sharing a stream round identically.
    Update (decoupled weight decay, as torch.optim.AdamW): p <- p(1 - lr wd) - lr mhat / (sqrt(vhat) + eps).

    On CPU with kernels.native enabled (train.py's ``--native``), a bf16 parameter takes the fused native step
    (one pass over p, grad, m, v; no fp32 copy of p): the same fp32 op order and the same bits, so the moments are
    bitwise those of the PyTorch ops below and the parameters differ only where torch's sqrt is off by an fp32
    ulp and the bits fall on that boundary (tests/test_native_sr.py).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, seed=0, sr_stream=0,
                 hardware_sr=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sr_stream=sr_stream, sr_step=0)
        super().__init__(params, defaults)
        self.seed = seed
        self.hardware_sr = hardware_sr

    def load_state_dict(self, state_dict):
        # torch.optim.Optimizer.load_state_dict casts floating state to the parameter's dtype (bf16 here), which
        # would round exp_avg / exp_avg_sq on every resume: put the saved fp32 tensors back.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, s in saved.items():
            p = params[int(idx)]
            for k, v in s.items():
                if torch.is_tensor(v) and v.is_floating_point():
                    self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["sr_step"] += 1
            t = group["sr_step"]
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            fused = not self.hardware_sr and 1 - b1 < 0.5 and native.enabled()   # 1 - b1 < 0.5: lerp's formula
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                key = sr_tensor_key(self.seed, t, group["sr_stream"], index)
                if fused and p.dtype == torch.bfloat16 and native.supports(p, p.grad):
                    torch.ops.llama_kernels.native_adamw_sr_(p, p.grad, m, v, lr, b1, b2, eps, wd, bc1, bc2, key)
                    continue
                g = p.grad.float()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                denom = (v / bc2).sqrt_().add_(eps)
                p32.addcdiv_(m, denom, value=-lr / bc1)
                if p.dtype == torch.float32:
                    p.copy_(p32)
                elif self.hardware_sr or p.dtype != torch.bfloat16:
                    p.copy_(p32)                      # hardware SR on XLA; RNE for other dtypes
                else:
                    p.copy_(stochastic_round_bf16(p32, key=key))
        return None


def param_groups(model, weight_decay: float, tp_rank: int):
    """AdamW groups: (decay | no decay) x (TP-replicated | TP-sharded), each with its SR stream."""
    from llama.parallel import is_tp_replicated
    buckets = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2
        shared = bool(is_tp_replicated(p))
        buckets.setdefault((decay, shared), []).append(p)
    groups = []
    for (decay, shared), params in sorted(buckets.items()):
        groups.append(dict(params=params, weight_decay=weight_decay if decay else 0.0,
                           sr_stream=SHARED_STREAM if shared else sharded_stream(tp_rank)))
    return groups


def build_optimizer(model, cfg, tp_rank: int, dp_group=None, hardware_sr=False):
    """SRAdamW for bf16-sr, torch.optim.AdamW (foreach) otherwise; wrapped in ZeroRedundancyOptimizer for ZeRO-1."""
    groups = param_groups(model, cfg.weight_decay, tp_rank)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.precision == "bf16-sr":
        cls, kw = SRAdamW, dict(lr=cfg.lr, betas=betas, eps=cfg.eps, seed=cfg.seed, hardware_sr=hardware_sr)
    else:
        cls, kw = torch.optim.AdamW, dict(lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=True)
        for g in groups:
            g.pop("sr_stream")
    if not cfg.zero1:
        return cls(groups, **kw)
    from torch.distributed.optim import ZeroRedundancyOptimizer
    zero = ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=dp_group, **kw)
    return zero


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Multiplier of the peak lr at optimizer step s (0-based): linear warmup to 1 over warmup_steps, then cosine
    decay to min_lr_ratio at max_steps, constant after."""
    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))


def global_grad_norm(params, tp_group=None, pp_group=None) -> torch.Tensor:
    """L2 norm of all gradients of the (TP-sharded) model, in fp32.

    Squares are summed in fp32 per parameter and divided by the number of TP ranks holding that exact tensor
    (``llama.parallel.tp_replicas``: tp for norm weights, 1 for shards) so each logical element counts once,
    then all-reduced over the TP group (and over the PP group, whose stages hold disjoint parameters). No DP
    reduction: after the DP all-reduce every DP rank holds the same gradients."""
    return _global_l2([(p, p.grad) for p in params if p.grad is not None], tp_group, pp_group)


def global_param_norm(params, tp_group=None, pp_group=None) -> torch.Tensor:
    """L2 norm of the whole (TP-sharded) model's parameters, in fp32, counted as ``global_grad_norm`` counts
    gradients (DP ranks hold identical parameters)."""
    return _global_l2([(p, p.detach()) for p in params], tp_group, pp_group)


def _global_l2(pairs, tp_group, pp_group=None) -> torch.Tensor:
    from llama.parallel import tp_replicas
    if not pairs:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float32, device=pairs[0][1].device)
    for p, t in pairs:
        total += t.float().pow(2).sum() / tp_replicas(p)
    for group in (tp_group, pp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grads_(params, norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad_norm_'s rule)."""
    if max_norm <= 0:
        return
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))


def allreduce_grads(params, group) -> None:
    """Sum gradients over the DP group in fp32 (one flat buffer): bf16 reductions lose low bits (a known trap)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


class NanGuard:
    """Counts steps whose gradient norm is NaN/Inf (the step is skipped) and stops after ``max_consecutive``."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, grad_norm: torch.Tensor) -> bool:
        """True when the step may proceed."""
        ok = bool(torch.isfinite(grad_norm))
        if ok:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
        return ok

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self):
        return dict(skipped=self.skipped, consecutive=self.consecutive)

    def load_state_dict(self, d):
        self.skipped, self.consecutive = int(d["skipped"]), int(d["consecutive"])
