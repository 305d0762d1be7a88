"""The fused kernels as torch custom ops (``torch.library``), each with three backends.

Public ops (Hugging Face Llama semantics; shapes and numerics in ``kernels/reference.py``):
    rms_norm(x, weight, eps=1e-5) -> y                        y in x.dtype
    apply_rope(q, k, cos, sin) -> (q_rot, k_rot)              q [B,Hq,S,D], k [B,Hkv,S,D], cos/sin [S,D] or [B,S,D]
    swiglu(gate, up) -> silu(gate) * up
    flash_attention(q, k, v, causal=True, softmax_scale=None) q [B,Hq,S,D], k/v [B,Hkv,S,D], Hq % Hkv == 0

Every forward and every backward is its own custom op ``llama_kernels::<name>`` (so the backward also
dispatches by backend), with ``register_fake`` for FakeTensor/compile and ``register_autograd`` tying them.

Backends, read at call time:
    reference  pure PyTorch; the default on CPU and CUDA; any float dtype incl. float64. The public functions
               call kernels.reference directly, without custom-op dispatch (measurably faster on CPU):
               rms_norm and apply_rope through a plain autograd.Function tying the reference forward to the
               reference backward, swiglu under plain autograd (F.silu's fused backward was fastest there),
               flash_attention as torch's fused scaled_dot_product_attention. The custom ops below still run the
               reference on this backend when called directly (opcheck tests, torch.library users).
    sim        the NKI kernels of kernels/<op>.py run by the interpreter kernels.sim on CPU tensors
    nki        the same kernels under the real ``nki.jit`` on XLA tensors (trn1); the default on XLA devices
On the reference backend, CPU float32/bfloat16 rms_norm and swiglu run the native C++ kernels of kernels/native
when ``kernels.native.enabled()`` (train.py's ``--native``, default auto; the library's default is off): the
reference's casting order and fp32 arithmetic, bit for bit equal to it in the forward and in RMSNorm's dx and
SwiGLU's backward formulas (kernels.reference.swiglu_bwd_ref); RMSNorm's dw is summed over rows in another order.
Chosen by ``use_backend(name)`` (context manager), ``set_backend(name)``, or the environment variable
``LLAMA_KERNELS_BACKEND`` (read once, at import). An unknown name is a ValueError. Each backend is logged
once (logger "kernels.ops") the first time an op runs on it.

Attention: on the ``sim`` and ``nki`` backends ``flash_attention`` runs the NKI flash-attention kernels of
kernels/attention.py (forward returns the fp32 log-sum-exp that the backward kernel recomputes P from; GQA by
head mapping, dK/dV summed over each group inside the kernel); float32/bfloat16, head_dim <= 128, sequence
length <= attention.MAX_SEQ (8192 bf16, 4096 fp32), any other input is a ValueError from the launcher.
"""

import contextlib
import importlib
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import native
from kernels import reference as ref

log = logging.getLogger("kernels.ops")

BACKENDS = ("reference", "sim", "nki")
_ENV = "LLAMA_KERNELS_BACKEND"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


# --------------------------------------------------------------------------- backend selection

def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError(f"kernels.ops: unknown backend {name!r} from {source}; valid names are "
                         f"{', '.join(BACKENDS)}")
    return name


def _backend_from_env():
    """The backend named by $LLAMA_KERNELS_BACKEND (validated), or None when unset or empty (automatic)."""
    name = os.environ.get(_ENV, "").strip()
    return _check_name(name, f"${_ENV}") if name else None


_selected = _backend_from_env()        # None: automatic (nki on XLA tensors, reference otherwise)
_nki_checked = False
_logged = set()


def _require_real_nki():
    """Raise unless the kernel modules would run under the real nki.jit (kernels.nki_compat.BACKEND == 'nki')."""
    global _nki_checked
    if _nki_checked:
        return
    try:
        compat = importlib.import_module("kernels.nki_compat")
    except ImportError as e:
        raise RuntimeError(f"kernels.ops: backend 'nki' needs the real NKI package (Neuron SDK on a trn1 host); "
                           f"importing kernels.nki_compat failed: {e}") from e
    if getattr(compat, "BACKEND", None) != "nki":
        raise RuntimeError("kernels.ops: backend 'nki' needs the real NKI package, but kernels.nki_compat "
                           f"selected {getattr(compat, 'BACKEND', None)!r} (real nki not importable, or "
                           "LLAMA_KERNELS_NKI=sim). Use backend 'sim' for the interpreter on CPU tensors, or "
                           "LLAMA_KERNELS_BACKEND=reference for plain PyTorch on any device.")
    _nki_checked = True


def set_backend(name):
    """Select the backend for all later calls; None restores the automatic choice."""
    global _selected
    if name is not None:
        _check_name(name, "set_backend()")
        if name == "nki":
            _require_real_nki()
    _selected = name


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the ``with`` block on backend ``name`` ("reference", "sim" or "nki")."""
    _check_name(name, "use_backend()")
    if name == "nki":
        _require_real_nki()
    global _selected
    previous = _selected
    _selected = name
    try:
        yield name
    finally:
        _selected = previous


def get_backend(*tensors):
    """The backend a call with these tensors would use (the explicit choice, else nki on XLA, else reference)."""
    if _selected is not None:
        return _selected
    return "nki" if any(t.device.type == "xla" for t in tensors) else "reference"


def _active(op, tensors):
    """Resolve, check and log (once) the backend for one op call."""
    name = get_backend(*tensors)
    if name == "sim":
        bad = [t for t in tensors if t.device.type != "cpu"]
        if bad:
            raise ValueError(f"kernels.ops.{op}: backend 'sim' runs the interpreter on CPU tensors, got a tensor "
                             f"on {bad[0].device}")
    elif name == "nki":
        _require_real_nki()
        bad = [t for t in tensors if t.device.type != "xla"]
        if bad:
            raise ValueError(f"kernels.ops.{op}: backend 'nki' needs XLA (Neuron) tensors, got a tensor on "
                             f"{bad[0].device}; use backend 'reference' or 'sim' for CPU tensors")
    if name not in _logged and not torch.compiler.is_compiling():     # a log call would break a compiled graph
        _logged.add(name)
        log.info("kernels.ops: backend %r active (first op: %s)", name, op)
    if any(t.numel() == 0 for t in tensors):
        # an empty batch (zero rows or tokens): a kernel has no empty launch grid, and the reference's result
        # there is exact and tiny (empty outputs, zero weight gradients)
        return "reference"
    return name


def _kernel_module(name):
    """Import kernels.<name> (C2's NKI kernels with torch-level launchers) lazily."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError as e:
        raise RuntimeError(f"kernels.ops: the kernel module kernels/{name}.py could not be imported for the "
                           f"sim/nki backend: {e}") from e


# --------------------------------------------------------------------------- validation helpers

def _check_dtype(op, name, t, backend):
    if t.dtype not in _FLOATS:
        raise ValueError(f"kernels.ops.{op}: {name} has dtype {t.dtype}; supported: float32, bfloat16, "
                         f"float16, float64 (float64 and float16 on the reference backend only)")
    if backend != "reference" and t.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"kernels.ops.{op}: {name} has dtype {t.dtype}; backend {backend!r} supports float32 "
                         f"and bfloat16 only")


def _shape(t):
    return tuple(t.shape)


def _dense(*ts):
    # Every op returns contiguous tensors, whatever the input strides (HF passes q/k as transposed views):
    # the fake kernels promise exactly that, so compiled graphs see the strides the real kernels produce.
    return tuple(t.contiguous() for t in ts)


def _empty(t, dtype=None):
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


# --------------------------------------------------------------------------- RMSNorm

@torch.library.custom_op("llama_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd): y in x.dtype, rstd [x.shape[:-1]] in fp32 (fp64 for fp64 input)."""
    backend = _active("rms_norm", (x, weight))
    if backend == "reference":
        return _dense(*ref.rms_norm_ref(x, weight, eps))
    h = x.shape[-1]
    y2d, rstd = _kernel_module("rmsnorm").rms_norm_fwd(x.reshape(-1, h), weight.to(x.dtype), eps)
    return _dense(y2d.reshape(x.shape), rstd.reshape(x.shape[:-1]))


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return _empty(x), x.new_empty(x.shape[:-1], dtype=torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op("llama_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(dx in x.dtype, dweight in weight.dtype)."""
    backend = _active("rms_norm_bwd", (dy, x, weight, rstd))
    if backend == "reference":
        return _dense(*ref.rms_norm_bwd_ref(dy, x, weight, rstd))
    h = x.shape[-1]
    dx2d, dw = _kernel_module("rmsnorm").rms_norm_bwd(dy.reshape(-1, h).to(x.dtype), x.reshape(-1, h),
                                                     weight.to(x.dtype), rstd.reshape(-1))
    return _dense(dx2d.reshape(x.shape), dw.to(weight.dtype))


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return _empty(x), _empty(weight)


def _rms_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy.contiguous(), x, weight, rstd)
    return dx, dw, None


_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


class _RMSNormReference(torch.autograd.Function):
    """rms_norm on the reference backend: ``ref.rms_norm_ref`` forward, ``ref.rms_norm_bwd_ref`` backward.

    The custom op's pair without its dispatch: at 1024 x 256 fp32 a forward plus backward took 1.6 ms on our
    2-core CPU VM against 2.4 ms for autograd through the forward formula, which records and replays every
    elementwise step.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = ref.rms_norm_ref(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dw = ref.rms_norm_bwd_ref(dy, *ctx.saved_tensors)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm of x [..., H] with weight [H], Llama casting (normalise in fp32, cast to x.dtype, times weight).

    Returns y with x's shape and dtype. On the sim/nki backends a weight of another dtype is first cast
    to x.dtype (the kernels take equal dtypes); its gradient is returned in the weight's own dtype.
    """
    backend = get_backend(x, weight)
    _check_dtype("rms_norm", "x", x, backend)
    _check_dtype("rms_norm", "weight", weight, backend)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"kernels.ops.rms_norm: x must have a non-empty last (hidden) dim, got shape {_shape(x)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"kernels.ops.rms_norm: weight has shape {_shape(weight)}, expected ({x.shape[-1]},) "
                         f"to match the last dim of x {_shape(x)}")
    eps = float(eps)
    if not eps > 0.0:
        raise ValueError(f"kernels.ops.rms_norm: eps must be > 0, got {eps}")
    if _active("rms_norm", (x, weight)) == "reference":
        if native.enabled() and native.supports(x, weight):
            return native.rms_norm(x, weight, eps)          # the same numerics in one fused pass (CPU)
        # The reference forward and backward tied by a plain autograd.Function: no custom-op dispatch (the
        # custom op above serves sim/nki and opcheck) and fewer passes than autograd through the formula.
        return _RMSNormReference.apply(x, weight, eps)
    y, _rstd = _rms_norm_fwd(x, weight, eps)
    return y


# --------------------------------------------------------------------------- RoPE

def _cos_sin_bsd(cos, sin, b):
    """cos/sin [S,D] or [1|B,S,D] -> contiguous [B,S,D] for the kernels (which take them broadcast)."""
    def full(t):
        if t.dim() == 2:
            t = t.unsqueeze(0)
        return t.expand(b, *t.shape[1:]).contiguous()
    return full(cos), full(sin)


@torch.library.custom_op("llama_kernels::rope_fwd", mutates_args=())
def _rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    backend = _active("apply_rope", (q, k, cos, sin))
    if backend == "reference":
        return _dense(*ref.apply_rope_ref(q, k, cos, sin))
    c, s = _cos_sin_bsd(cos, sin, q.shape[0])
    return _dense(*_kernel_module("rope").rope_fwd(q, k, c, s))


@_rope_fwd.register_fake
def _(q, k, cos, sin):
    return _empty(q), _empty(k)


@torch.library.custom_op("llama_kernels::rope_bwd", mutates_args=())
def _rope_bwd(dq_rot: Tensor, dk_rot: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    backend = _active("apply_rope_bwd", (dq_rot, dk_rot, cos, sin))
    if backend == "reference":
        return _dense(*ref.rope_bwd_ref(dq_rot, dk_rot, cos, sin))
    c, s = _cos_sin_bsd(cos, sin, dq_rot.shape[0])
    return _dense(*_kernel_module("rope").rope_bwd(dq_rot, dk_rot, c, s))


@_rope_bwd.register_fake
def _(dq_rot, dk_rot, cos, sin):
    return _empty(dq_rot), _empty(dk_rot)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    # q and k are kept only when the rotary tables themselves need gradients (they are usually constants).
    ctx.tables_grad = cos.requires_grad or sin.requires_grad
    ctx.dtypes = (q.dtype, k.dtype)
    if ctx.tables_grad:
        ctx.save_for_backward(cos, sin, q, k)
    else:
        ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq_rot, dk_rot):
    cos, sin = ctx.saved_tensors[:2]
    dq_rot = dq_rot.to(ctx.dtypes[0]).contiguous()
    dk_rot = dk_rot.to(ctx.dtypes[1]).contiguous()
    dq, dk = _rope_bwd(dq_rot, dk_rot, cos, sin)
    dcos = dsin = None
    if ctx.tables_grad:
        q, k = ctx.saved_tensors[2:]
        dcos, dsin = ref.rope_cos_sin_grad_ref(dq_rot, dk_rot, q, k, cos, sin)
    return dq, dk, dcos, dsin


_rope_fwd.register_autograd(_rope_backward, setup_context=_rope_setup)


class _RopeReference(torch.autograd.Function):
    """apply_rope on the reference backend: ``ref.apply_rope_ref`` forward, ``ref.rope_bwd_ref`` backward
    (and ``ref.rope_cos_sin_grad_ref`` when the tables need gradients), without custom-op dispatch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.tables_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(cos, sin, *((q, k) if ctx.tables_grad else ()))
        return ref.apply_rope_ref(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors[:2]
        dq, dk = ref.rope_bwd_ref(dq_rot, dk_rot, cos, sin)
        dcos = dsin = None
        if ctx.tables_grad:
            dcos, dsin = ref.rope_cos_sin_grad_ref(dq_rot, dk_rot, *ctx.saved_tensors[2:], cos, sin)
        return dq, dk, dcos, dsin


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [B,Hq,S,D] and k [B,Hkv,S,D] with cos/sin [S,D], [1,S,D] or [B,S,D].

    Hugging Face ``apply_rotary_pos_emb`` (rotate-half) semantics with its default unsqueeze over heads;
    outputs in the dtypes of q and k. head_dim must be even and <= 128. Rounding: ``reference`` computes in the
    compute dtype and rounds once; the sim/nki kernel (kernels/rope.py) with all of q, cos, sin in bf16 rounds the
    two products to bf16 and their fp32 sum once (where PyTorch in bf16 rounds), and with any fp32 operand
    computes in fp32 and rounds once.
    """
    backend = get_backend(q, k, cos, sin)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_dtype("apply_rope", name, t, backend)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"kernels.ops.apply_rope: q and k must be 4-D [B, heads, S, D], got q {_shape(q)}, "
                         f"k {_shape(k)}")
    b, _hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"kernels.ops.apply_rope: k {_shape(k)} must match q {_shape(q)} in batch, sequence "
                         f"and head_dim")
    if d % 2 or d > 128 or d < 2:
        raise ValueError(f"kernels.ops.apply_rope: head_dim {d} (q {_shape(q)}) must be even and <= 128")
    allowed = ((s, d), (1, s, d), (b, s, d))
    for name, t in (("cos", cos), ("sin", sin)):
        if _shape(t) not in allowed:
            raise ValueError(f"kernels.ops.apply_rope: {name} has shape {_shape(t)}; expected [S, D] = {(s, d)} "
                             f"or [B, S, D] = {(b, s, d)} (or [1, S, D])")
    if _shape(cos) != _shape(sin):
        raise ValueError(f"kernels.ops.apply_rope: cos {_shape(cos)} and sin {_shape(sin)} differ in shape")
    if _active("apply_rope", (q, k, cos, sin)) == "reference":
        return _RopeReference.apply(q, k, cos, sin)         # no custom-op dispatch, as in rms_norm
    return _rope_fwd(q, k, cos, sin)


# --------------------------------------------------------------------------- SwiGLU

@torch.library.custom_op("llama_kernels::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    backend = _active("swiglu", (gate, up))
    if backend == "reference":
        return ref.swiglu_ref(gate, up).contiguous()
    f = gate.shape[-1]
    out2d = _kernel_module("swiglu").swiglu_fwd(gate.reshape(-1, f), up.reshape(-1, f))
    return out2d.reshape(gate.shape).contiguous()


@_swiglu_fwd.register_fake
def _(gate, up):
    return _empty(gate)


@torch.library.custom_op("llama_kernels::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    backend = _active("swiglu_bwd", (dout, gate, up))
    if backend == "reference":
        return _dense(*ref.swiglu_bwd_ref(dout, gate, up))
    f = gate.shape[-1]
    dg, du = _kernel_module("swiglu").swiglu_bwd(dout.reshape(-1, f).to(gate.dtype), gate.reshape(-1, f),
                                                 up.reshape(-1, f))
    return _dense(dg.reshape(gate.shape), du.reshape(up.shape))


@_swiglu_bwd.register_fake
def _(dout, gate, up):
    return _empty(gate), _empty(up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd(dout.contiguous(), gate, up)


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for equal-shaped, equal-dtype gate and up; fp32 inside, output in gate.dtype."""
    backend = get_backend(gate, up)
    _check_dtype("swiglu", "gate", gate, backend)
    _check_dtype("swiglu", "up", up, backend)
    if _shape(gate) != _shape(up) or gate.dim() < 1:
        raise ValueError(f"kernels.ops.swiglu: gate {_shape(gate)} and up {_shape(up)} must have the same "
                         f"shape of rank >= 1")
    if gate.dtype != up.dtype:
        raise ValueError(f"kernels.ops.swiglu: gate dtype {gate.dtype} differs from up dtype {up.dtype}")
    if _active("swiglu", (gate, up)) == "reference":
        if native.enabled() and native.supports(gate, up):
            return native.swiglu(gate, up)
        return ref.swiglu_ref(gate, up)                     # plain autograd, as in rms_norm
    return _swiglu_fwd(gate, up)


# --------------------------------------------------------------------------- attention

@torch.library.custom_op("llama_kernels::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                         softmax_scale: float) -> tuple[Tensor, Tensor]:
    backend = _active("flash_attention", (q, k, v))
    if backend == "reference":
        return _dense(*ref.flash_attention_ref(q, k, v, causal, softmax_scale))
    return _dense(*_kernel_module("attention").flash_attention_fwd(q, k, v, causal, softmax_scale))


@_flash_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale):
    lse = q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))
    return _empty(q), lse


@torch.library.custom_op("llama_kernels::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    backend = _active("flash_attention_bwd", (dout, q, k, v))
    if backend == "reference":
        return _dense(*ref.flash_attention_bwd_ref(dout, q, k, v, out, lse, causal, softmax_scale))
    return _dense(*_kernel_module("attention").flash_attention_bwd(q, k, v, out, dout.to(q.dtype), lse, causal,
                                                                   softmax_scale))


@_flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale):
    return _empty(q), _empty(k), _empty(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.save_for_backward(q, k, v, out, lse)


def _attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None


_flash_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def _sdpa(q, k, v, causal, scale):
    """The reference backend's attention: PyTorch's fused SDPA with native GQA and its own autograd.

    Same semantics as ``reference.flash_attention_ref`` (tested against the same float64 formula). fp32 and
    fp64 inputs run in their own dtype. Lower precisions are upcast to fp32 here and the output rounded once,
    which is the reference's numerics (fp32 scores, softmax and P @ V) whatever SDPA kernel gets picked.
    Autocast is disabled inside so that it cannot cast the fp32 operands back down.
    """
    if q.dtype in (torch.float32, torch.float64):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, scale=scale,
                                             enable_gqa=True)
    return out.to(q.dtype)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> Tensor:
    """Attention with native GQA: q [B,Hq,S,D], k/v [B,Hkv,S,D], Hq % Hkv == 0, q head h uses kv head h // (Hq//Hkv).

    softmax(q k^T * scale [+ causal mask]) v with scale = 1/sqrt(D) by default; scores and softmax in fp32,
    output in q.dtype. The backward recomputes the probabilities from the saved log-sum-exp and sums
    dK/dV over each GQA group without repeating K/V. On the sim and nki backends this runs the NKI kernels of
    kernels/attention.py (float32/bfloat16); on the reference backend it is torch's fused SDPA with
    enable_gqa (``_sdpa``), tested against the same float64 formula.
    """
    backend = get_backend(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_dtype("flash_attention", name, t, backend)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels.ops.flash_attention: q, k, v must be 4-D [B, heads, S, D], got q {_shape(q)}, "
                         f"k {_shape(k)}, v {_shape(v)}")
    if _shape(k) != _shape(v):
        raise ValueError(f"kernels.ops.flash_attention: k {_shape(k)} and v {_shape(v)} must have the same shape")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"kernels.ops.flash_attention: k/v {_shape(k)} must match q {_shape(q)} in batch, "
                         f"sequence and head_dim (self-attention, Sq == Sk)")
    if min(hq, d, k.shape[1]) < 1:           # an empty batch (b or s zero) is allowed: an empty result
        raise ValueError(f"kernels.ops.flash_attention: zero heads or head_dim in q {_shape(q)}, k {_shape(k)}")
    if hq % k.shape[1]:
        raise ValueError(f"kernels.ops.flash_attention: query heads {hq} (q {_shape(q)}) must be a multiple of "
                         f"kv heads {k.shape[1]} (k {_shape(k)}) for GQA")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"kernels.ops.flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    scale = 1.0 / d ** 0.5 if softmax_scale is None else float(softmax_scale)
    if _active("flash_attention", (q, k, v)) == "reference":
        return _sdpa(q, k, v, bool(causal), scale)
    out, _lse = _flash_attention_fwd(q, k, v, bool(causal), scale)
    return out


__all__ = ["BACKENDS", "apply_rope", "flash_attention", "get_backend", "rms_norm", "set_backend", "swiglu",
           "use_backend"]
