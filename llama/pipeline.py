"""Pipeline parallelism applied to a ``llama.Llama`` from outside, run by ``torch.distributed.pipelining``.

``split_stages(model, pp, pp_rank, ...)`` cuts a (possibly TP-sharded) Llama into this rank's stage modules by
moving its submodules: the embedding goes to the first stage, the final norm, LM head and loss to the last, the
decoder layers are split into contiguous runs (balanced by parameter count, evenly, or an explicit list of layer
counts). ``model.py`` is untouched. Parameter names keep the full model's names (``layers.17.mlp.up_proj.weight``
on whichever stage holds layer 17), so the TP shard plan, checkpoints and ``to_hf`` address them as before.

``Pipeline`` wraps the stages in ``PipelineStage`` objects and one of PyTorch's schedules (GPipe, 1F1B,
interleaved 1F1B: https://docs.pytorch.org/docs/stable/distributed.pipelining.html). The schedule's
micro-batches are the gradient-accumulation micro-batches: ``step(ids, labels, n_valid)`` takes the step's
micro-batches concatenated along the batch dimension. The last stage's loss function returns
``sum of token losses / n_valid`` with ``n_valid`` the *global* count of valid tokens (all-reduced over DP by the
caller before the step), and the schedule's own gradient scaling is off, so gradients and the summed loss equal
the single-process ``train.py`` step exactly up to summation order.

Rank layout (``parallel.make_groups``): TP innermost (consecutive ranks), then DP, then PP outermost, so a stage
occupies a block of ``tp * dp`` consecutive ranks (whole trn1 nodes for PP across nodes). With ``virtual``
stages per rank (interleaved 1F1B) rank r of the PP group holds stages r, r + pp, r + 2 pp, ...
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from llama.config import LlamaConfig
from llama.parallel import ParallelError

SCHEDULES = ("gpipe", "1f1b", "interleaved")


# --------------------------------------------------------------------------- layout checks and the split

def layer_params(cfg: LlamaConfig) -> tuple[int, int, int]:
    """(embedding, one decoder layer, norm + LM head) parameter counts, the weights of the balanced split."""
    h = cfg.hidden_size
    per_layer = 2 * h * h + 2 * h * cfg.kv_dim + 3 * h * cfg.intermediate_size + 2 * h
    head = h + (0 if cfg.tie_word_embeddings else cfg.vocab_size * h)
    return cfg.vocab_size * h, per_layer, head


def split_layers(cfg: LlamaConfig, n_stages: int, split="params") -> list[range]:
    """Decoder-layer indices of each of n_stages stages (contiguous, every stage at least one layer).

    split "params": the contiguous split minimising the largest stage's parameter count, with the embedding
    counted on the first stage and the norm + LM head on the last; "even": num_layers / n_stages each (an error
    when not divisible); a list of layer counts: that split.
    """
    n = cfg.num_layers
    if n_stages < 1:
        raise ParallelError(f"pipeline: the number of stages must be >= 1, got {n_stages}")
    if n < n_stages:
        raise ParallelError(f"pipeline: {n_stages} stages need at least one decoder layer each, but the model has "
                            f"num_layers {n}")
    if isinstance(split, (list, tuple)):
        counts = [int(c) for c in split]
        if len(counts) != n_stages or sum(counts) != n or min(counts) < 1:
            raise ParallelError(f"pipeline: explicit split {list(split)} must give {n_stages} stages of >= 1 layer "
                                f"summing to num_layers {n}")
    elif split == "even":
        if n % n_stages:
            raise ParallelError(f"pipeline: num_layers {n} is not divisible by the {n_stages} stages (split 'even');"
                                f" use split 'params' or an explicit list of layer counts")
        counts = [n // n_stages] * n_stages
    elif split == "params":
        counts = _balanced_counts(cfg, n_stages)
    else:
        raise ParallelError(f"pipeline: split must be 'params', 'even' or a list of layer counts, got {split!r}")
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def _balanced_counts(cfg, n_stages):
    """Layer counts minimising the maximum stage weight (small exhaustive dynamic programme over the counts)."""
    emb, layer, head = layer_params(cfg)
    n = cfg.num_layers
    # best[s][i]: minimal max-weight of stages s.. holding layers i..n-1 (stage s first of those)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[n_stages][n] = 0
    for s in range(n_stages - 1, -1, -1):
        for i in range(n - 1, -1, -1):
            for c in range(1, n - i - (n_stages - s - 1) + 1):
                w = c * layer + (emb if s == 0 else 0) + (head if s == n_stages - 1 else 0)
                m = max(w, best[s + 1][i + c])
                if m < best[s][i]:                      # strict: ties keep the smallest first stage
                    best[s][i], choice[s][i] = m, c
    counts, i = [], 0
    for s in range(n_stages):
        counts.append(choice[s][i])
        i += choice[s][i]
    return counts


def check_layout(cfg: LlamaConfig, world: int, tp: int, pp: int, schedule: str = "1f1b", virtual: int = 1,
                 n_microbatches: int | None = None, split="params") -> int:
    """Validate a (TP, PP, DP) layout before anything starts; returns dp. ParallelError naming the rule."""
    for name, v in (("tp", tp), ("pp", pp), ("virtual stages", virtual)):
        if not isinstance(v, int) or v < 1:
            raise ParallelError(f"pipeline layout: {name} must be an integer >= 1, got {v!r}")
    if world % (tp * pp):
        raise ParallelError(f"pipeline layout: world size {world} is not a multiple of tp {tp} x pp {pp} = "
                            f"{tp * pp} (world = tp x pp x dp)")
    if schedule not in SCHEDULES:
        raise ParallelError(f"pipeline layout: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if virtual > 1 and pp == 1:
        raise ParallelError(f"pipeline layout: {virtual} virtual stages need pp > 1")
    if virtual > 1 and schedule != "interleaved":
        raise ParallelError(f"pipeline layout: {virtual} virtual stages per rank need the 'interleaved' schedule, "
                            f"not {schedule!r}")
    if schedule == "interleaved" and virtual < 2:
        raise ParallelError("pipeline layout: the 'interleaved' schedule needs virtual stages >= 2 per rank")
    n_stages = pp * virtual
    if cfg.num_layers < n_stages:
        raise ParallelError(f"pipeline layout: pp {pp} x {virtual} virtual stage(s) = {n_stages} stages, but "
                            f"num_layers is only {cfg.num_layers} (each stage needs at least one decoder layer)")
    split_layers(cfg, n_stages, split)
    if cfg.tie_word_embeddings and n_stages > 1:
        raise ParallelError("pipeline layout: tie_word_embeddings with more than one stage would put the embedding "
                            "and the LM head (one tensor) on two ranks; not supported")
    if n_microbatches is not None and pp > 1:
        if schedule in ("1f1b", "interleaved") and n_microbatches < pp:
            raise ParallelError(f"pipeline layout: schedule {schedule!r} needs at least pp = {pp} micro-batches "
                                f"per step (gradient accumulation), got {n_microbatches}")
        if schedule == "interleaved" and n_microbatches % pp:
            raise ParallelError(f"pipeline layout: interleaved 1F1B needs the micro-batch count ({n_microbatches})"
                                f" to be a multiple of pp {pp}")
    return world // (tp * pp)


# --------------------------------------------------------------------------- stage modules

class _Layers(nn.ModuleDict):
    """The decoder layers of one stage keyed by their global index (parameter names ``layers.<i>.``),
    iterated in order like ``Llama.layers`` (``apply_activation_checkpointing`` loops over them)."""

    def __iter__(self):
        return iter(self.values())


class StageModule(nn.Module):
    """Layers [first, last] of a Llama, plus the embedding (first stage) or the norm, LM head and loss (last).

    ``forward(x)``: token ids [B, S] on the first stage, else the residual stream from the previous stage; returns
    the residual stream, or on the last stage the final norm's output (the loss, which applies the LM head, is the
    pipeline's loss function). Attributes keep the names of ``Llama``'s, so the TP helpers of ``llama.parallel``
    (``full_state_dict``, ``allreduce_replicated_grads``, ``apply_activation_checkpointing``) work on a stage.
    """

    def __init__(self, model, index: int, n_stages: int, layers: range):
        super().__init__()
        self.config, self.index, self.n_stages = model.config, index, n_stages
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self._tp = getattr(model, "_tp", None)
        self._ac_mode = getattr(model, "_ac_mode", "none")
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.layers = _Layers({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if self.is_last else None
        if self.is_last:
            self.lm_head, self.loss_fn = model.lm_head, model.loss_fn
        if model.config.tie_word_embeddings and n_stages > 1:
            raise ParallelError("pipeline: tie_word_embeddings with more than one stage is not supported")

    def _seq_len(self, h):
        st = self._tp
        return h.shape[1] * (st.tp if st is not None and st.sequence_parallel else 1)

    def forward(self, x):
        h = self.embed_tokens(x) if self.is_first else x
        seq = x.shape[1] if self.is_first else self._seq_len(h)
        cos, sin = self.rotary(seq, h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h) if self.is_last else h


class LocalModel(nn.Module):
    """This rank's stages as one module under ``Llama``'s names (``embed_tokens``, ``layers.<i>``, ``norm``,
    ``lm_head``): what the optimizer, checkpoints, norms and ``llama.parallel``'s helpers see. The stages (kept in a
    plain list, so no parameter is registered twice) share these submodules and run the pipeline."""

    def __init__(self, stages: list[StageModule]):
        super().__init__()
        self.config, self._tp, self._ac_mode = stages[0].config, stages[0]._tp, stages[0]._ac_mode
        layers = {}
        for s in stages:
            layers.update(s.layers.items())
            if s.is_first:
                self.embed_tokens = s.embed_tokens
            if s.is_last:
                self.norm, self.lm_head = s.norm, s.lm_head
        self.layers = _Layers(sorted(layers.items(), key=lambda kv: int(kv[0])))
        self.stages = list(stages)

    def forward(self, *args, **kwargs):
        raise RuntimeError("LocalModel holds pipeline stages; run them with llama.pipeline.Pipeline.step")


def stage_indices(pp: int, pp_rank: int, virtual: int = 1) -> list[int]:
    """The stages rank pp_rank of the PP group holds (looped placement: r, r + pp, ...)."""
    return [pp_rank + k * pp for k in range(virtual)]


def split_stages(model, pp: int, pp_rank: int, virtual: int = 1, split="params") -> list[StageModule]:
    """This rank's stage modules, made from ``model``'s own submodules (the rest is dropped with ``model``)."""
    n_stages = pp * virtual
    ranges = split_layers(model.config, n_stages, split)
    return [StageModule(model, i, n_stages, ranges[i]) for i in stage_indices(pp, pp_rank, virtual)]


# --------------------------------------------------------------------------- the schedule

def _schedule_class(name):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}[name]


class Pipeline:
    """This rank's stages under one PyTorch pipeline schedule.

    ``step(input_ids, labels, n_valid)``: input_ids / labels [n_microbatches * micro, S] (needed on the first /
    last stage only; others may pass None); runs forward and backward of every micro-batch, leaving gradients
    in the stages' parameters; returns the step's loss (sum over micro-batches of summed token losses / n_valid,
    a 0-d fp32 tensor) on the rank holding the last stage, None elsewhere.
    """

    def __init__(self, stages: list[StageModule], pp_group, schedule: str, n_microbatches: int,
                 micro_batch_size: int, seq_len: int, device, dtype: torch.dtype):
        from torch.distributed.pipelining import PipelineStage
        self.stages = stages
        self.n_microbatches = n_microbatches
        self.has_last = any(s.is_last for s in stages)
        self.has_first = any(s.is_first for s in stages)
        self._n_valid = None
        cfg = stages[0].config
        st = stages[0]._tp
        s_local = seq_len // (st.tp if st is not None and st.sequence_parallel else 1)
        hidden = torch.empty(micro_batch_size, s_local, cfg.hidden_size, dtype=dtype, device="meta",
                             requires_grad=True)       # static metadata: says the activation carries a gradient
        out_last = torch.empty(micro_batch_size, seq_len if st is not None and st.sequence_parallel else s_local,
                               cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
        ids = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device="meta")
        self.pipeline_stages = [
            PipelineStage(s, s.index, s.n_stages, device, input_args=ids if s.is_first else hidden,
                          output_args=out_last if s.is_last else hidden, group=pp_group)
            for s in stages]
        cls = _schedule_class(schedule)
        kw = dict(n_microbatches=n_microbatches, loss_fn=self._loss)
        if "scale_grads" in inspect.signature(cls.__init__).parameters:
            kw["scale_grads"] = False           # our loss is already divided by the global valid-token count
        target = self.pipeline_stages if schedule == "interleaved" else self.pipeline_stages[0]
        self.schedule = cls(target, **kw)
        self._step_kw = {}
        if "return_outputs" in inspect.signature(self.schedule.step).parameters:
            self._step_kw["return_outputs"] = False

    def _loss(self, hidden, labels):
        last = next(s for s in self.stages if s.is_last)
        return last.loss_fn(hidden, last.lm_head.weight, labels, reduction="sum") / self._n_valid

    def step(self, input_ids, labels, n_valid: torch.Tensor):
        self._n_valid = n_valid.clamp(min=1)
        losses = [] if self.has_last else None
        args = (input_ids,) if self.has_first else ()
        self.schedule.step(*args, target=labels if self.has_last else None, losses=losses, **self._step_kw)
        if not self.has_last:
            return None
        return torch.stack([x.detach().float() for x in losses]).sum()

    def parameters(self):
        return [p for s in self.stages for p in s.parameters()]

    def named_parameters(self):
        return [(n, p) for s in self.stages for n, p in s.named_parameters()]


__all__ = ["SCHEDULES", "LocalModel", "Pipeline", "StageModule", "check_layout", "layer_params", "split_layers",
           "split_stages",
           "stage_indices"]
