"""Resume a checkpoint written under one (TP, PP) layout in another: this rank's model and optimizer state rebuilt
from the saved rank files.

What changes hands: every parameter and its AdamW moments (``exp_avg``, ``exp_avg_sq``; ``step``) are made whole
from the saved TP shards of the stage that held them (``llama.parallel.plan`` says how each was split; vocabulary
padding dropped, replicated K/V heads taken once) and cut again for this rank with ``parallel.shard_tensor``.
Parameters are matched by name: pipeline stages keep the full model's names, so a layer moves between stages
without renaming. The optimizer's hyper-parameters that evolve (lr, initial_lr, the SR step counter) come from
the saved groups; the per-group SR stream stays this rank's own. Scheduler, data position, NaN guard and step
come from the saved rank with this rank's DP index (the data order depends on the DP degree, which must not change).

Refused with a clear error: a different DP degree, ZeRO-1 (its optimizer shards follow the DP partition of
ZeroRedundancyOptimizer, not parameter names), a checkpoint without parameter names (written before resharding
existed), a missing rank file.
"""
from __future__ import annotations

import torch

from training import checkpoint as ckpt

# identity keys that describe the layout rather than the run: they may differ on a resharded resume
LAYOUT_KEYS = ("tp", "pp", "world_tp", "world_pp", "sequence_parallel")


def layout_of(meta: dict) -> tuple[int, int, int]:
    """(tp, pp, dp) a checkpoint was written with."""
    return int(meta.get("tp", 1)), int(meta.get("pp", 1)), int(meta.get("dp", 1))


def check_reshardable(path: str, meta: dict, tp: int, pp: int, dp: int, zero1: bool) -> None:
    old_tp, old_pp, old_dp = layout_of(meta)
    if old_dp != dp:
        raise ckpt.CheckpointError(f"checkpoint {path} was written with dp {old_dp}; resuming under dp {dp} would "
                                   f"change the data order (rule: a resharded resume keeps the DP degree; change tp / "
                                   f"pp only)")
    if zero1:
        raise ckpt.CheckpointError(f"checkpoint {path}: resuming under another layout (tp {old_tp} -> {tp}, pp "
                                   f"{old_pp} -> {pp}) is not supported with ZeRO-1 (its optimizer shards follow the "
                                   f"DP partition, not parameter names); resume in the saved layout")


def _saved_states(path, old_tp, old_pp, dp_rank):
    states = {}
    for pp_rank in range(old_pp):
        for tp_rank in range(old_tp):
            st = ckpt.load(path, tp_rank, dp_rank, pp_rank)
            if "param_names" not in st:
                raise ckpt.CheckpointError(f"checkpoint {path} (tp rank {tp_rank}, pp rank {pp_rank}) has no "
                                           f"parameter names; it predates resharding and resumes only in its layout")
            states[tp_rank, pp_rank] = st
    return states


def _unshard(shards: list, spec) -> torch.Tensor:
    """The full tensor from the TP shards in rank order (each distinct shard once; padding rows dropped)."""
    if spec.dim is None:
        return shards[0]
    full = torch.cat(shards[::spec.replicas], dim=spec.dim)
    return full.narrow(spec.dim, 0, spec.full).contiguous()


def _full_tensors(states, model_cfg, old_tp):
    """{name: full weight} and {name: {moment: full tensor or scalar}} over every saved stage."""
    from llama import parallel
    specs = parallel.plan(model_cfg, old_tp)
    by_stage = {}
    for (tp_rank, pp_rank), st in states.items():
        by_stage.setdefault(pp_rank, {})[tp_rank] = st
    weights, moments = {}, {}
    for pp_rank, ranks in by_stage.items():
        names = list(ranks[0]["model"])
        for name in names:
            weights[name] = _unshard([ranks[r]["model"][name] for r in range(old_tp)], specs[name])
        per_rank_state = []
        for r in range(old_tp):
            st = ranks[r]
            per_rank_state.append({st["param_names"][int(i)]: s for i, s in st["optimizer"]["state"].items()})
        for name in per_rank_state[0]:
            entry = {}
            for key, v in per_rank_state[0][name].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    entry[key] = _unshard([per_rank_state[r][name][key] for r in range(old_tp)], specs[name])
                else:
                    entry[key] = v
            moments[name] = entry
    return weights, moments


def resharded_state(path: str, meta: dict, model_cfg, model, optimizer, param_names: list, tp: int, tp_rank: int,
                    dp_rank: int) -> dict:
    """This rank's checkpoint state (the keys ``ckpt.load`` returns) for ``model`` / ``optimizer`` as built now.

    ``param_names``: the names of ``optimizer``'s parameters in its state_dict order."""
    from llama import parallel
    old_tp, old_pp, _ = layout_of(meta)
    states = _saved_states(path, old_tp, old_pp, dp_rank)
    weights, moments = _full_tensors(states, model_cfg, old_tp)
    specs = parallel.plan(model_cfg, tp)
    local = model.state_dict()
    missing = [n for n in local if n not in weights]
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks parameter(s) {', '.join(missing[:5])} of this model")
    model_state = {n: parallel.shard_tensor(weights[n], specs[n], tp_rank, tp).to(local[n].dtype) if tp > 1
                   else weights[n].to(local[n].dtype) for n in local}
    opt_state = optimizer.state_dict()
    new_state = {}
    for idx, name in enumerate(param_names):
        if name not in moments:
            continue                          # never stepped (no gradient yet): stays empty, as it was
        new_state[idx] = {k: (parallel.shard_tensor(v, specs[name], tp_rank, tp) if tp > 1 else v.clone())
                          if torch.is_tensor(v) and v.dim() > 0 else v for k, v in moments[name].items()}
    first = states[0, 0]
    saved_group = first["optimizer"]["param_groups"][0]
    for g in opt_state["param_groups"]:
        g.update({k: saved_group[k] for k in ("lr", "initial_lr", "sr_step") if k in saved_group})
    opt_state["state"] = new_state
    mine = states.get((0, 0))
    return dict(mine, model=model_state, optimizer=opt_state)
