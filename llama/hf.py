"""Hugging Face Llama checkpoints in and out: ``from_hf(path, tp_group=None)`` and ``to_hf(model, path)``.

The model's parameter names are Hugging Face's without the ``model.`` prefix (and ``lm_head.weight`` as is),
and q/k/v, gate/up are separate tensors in both, so conversion is a name map: no permutation, no fusing.
Tensors keep their dtype and bytes, so import followed by export is bit-identical.

Loading is lazy and sharded: every rank opens the safetensors files with ``safe_open`` and reads only its
rows / columns with ``get_slice``. Everything (config, index, files, names, shapes) is validated before the
model is built, so an error leaves nothing half-loaded. Writing goes to a temporary directory next to
the target, renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from llama import parallel
from llama.config import LlamaConfig
from llama.model import Llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")    # buffers some old checkpoints carry


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or is incomplete; the message names the file and tensor."""


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face LlamaForCausalLM state-dict key."""
    return name if name.startswith("lm_head.") else "model." + name


def expected_tensors(cfg: LlamaConfig) -> dict:
    """{HF key: (our name, full shape)} for every tensor a checkpoint of ``cfg`` must hold."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return {hf_name(n): (n, s) for n, s in shapes.items()}


def _weight_map(path: str) -> dict:
    """{HF key: shard file path} from the index, or from the single model.safetensors."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index):
        with open(index) as fh:
            try:
                wm = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"from_hf: {index} is not a safetensors index with a weight_map: {e}") from None
        files = {os.path.join(path, f) for f in wm.values()}
        missing = sorted(f for f in files if not os.path.isfile(f))
        if missing:
            raise CheckpointError(f"from_hf: shard file(s) listed in {index} are missing: {', '.join(missing)}")
        return {k: os.path.join(path, f) for k, f in wm.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as fh:
            return {k: single for k in fh.keys()}
    raise CheckpointError(f"from_hf: {path} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def _read_slice(fh, key, spec, rank, tp):
    sl = fh.get_slice(key)
    if spec is None or spec.dim is None:
        return sl[:]
    start, stop, local = spec.local_range(rank, tp)
    part = sl[start:stop] if spec.dim == 0 else sl[:, start:stop]
    if stop - start < local:
        shape = list(part.shape)
        shape[spec.dim] = local - (stop - start)
        part = torch.cat([part, part.new_zeros(shape)], dim=spec.dim)
    return part


def from_hf(path, tp_group=None, sequence_parallel: bool = False, pad_vocab_to_multiple_of=None,
            dtype: torch.dtype | None = None, pipeline: dict | None = None):
    """Load a Hugging Face Llama directory (config.json + model.safetensors or indexed shards).

    With ``tp_group`` the model is parallelized over it and each rank reads only its slices. With ``pipeline``
    (keyword arguments of ``llama.pipeline.split_stages``: pp, pp_rank, virtual, split) it returns this rank's
    ``llama.pipeline.LocalModel`` instead, having read only the tensors of its stages. Parameters keep the
    checkpoint's dtype unless ``dtype`` is given. Raises CheckpointError / ConfigError / ParallelError naming the
    file, tensor or degree; nothing is built before every check has passed.
    """
    path = os.fspath(path)
    cfg = LlamaConfig.from_hf(path)
    tp, rank = (1, 0) if tp_group is None else (dist.get_world_size(tp_group), dist.get_rank(tp_group))
    specs = parallel.plan(cfg, tp, pad_vocab_to_multiple_of) if tp_group is not None else None
    wmap = _weight_map(path)
    expected = expected_tensors(cfg)
    missing = [k for k in expected if k not in wmap]
    if missing:
        raise CheckpointError(f"from_hf: {path} lacks tensor(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} required by its config.json")
    tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unknown = [k for k in wmap if k not in expected and k not in tied_extra and not _IGNORED.search(k)]
    if unknown:
        raise CheckpointError(f"from_hf: {wmap[unknown[0]]} holds tensor(s) {', '.join(unknown[:5])} that a Llama "
                              f"with this config.json does not have")

    with torch.device("meta"):
        model = Llama(cfg)
    if tp_group is not None:
        parallel.parallelize(model, tp_group, sequence_parallel=sequence_parallel,
                             pad_vocab_to_multiple_of=pad_vocab_to_multiple_of)
    if pipeline is not None:
        from llama.pipeline import LocalModel, split_stages
        model = LocalModel(split_stages(model, **pipeline))
    wanted = {name for name, _ in model.named_parameters()}
    by_file = {}
    for key in expected:
        if expected[key][0] in wanted:
            by_file.setdefault(wmap[key], []).append(key)
    dtypes = set()
    local = {}
    for file, keys in by_file.items():            # validate every shape first ...
        with safe_open(file, framework="pt") as fh:
            present = set(fh.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"from_hf: tensor {key} is listed for {file} but not stored in it")
                sl = fh.get_slice(key)
                shape = tuple(sl.get_shape())
                want = expected[key][1]
                if shape != want:
                    raise CheckpointError(f"from_hf: tensor {key} in {file} has shape {shape}, but config.json "
                                          f"implies {want}")
                dtypes.add(sl.get_dtype())
    for file, keys in by_file.items():            # ... then read this rank's slices
        with safe_open(file, framework="pt") as fh:
            for key in keys:
                name = expected[key][0]
                local[name] = _read_slice(fh, key, None if specs is None else specs[name], rank, tp)
    if len(dtypes) > 1 and dtype is None:
        raise CheckpointError(f"from_hf: {path} mixes tensor dtypes {sorted(dtypes)}; pass dtype= to choose one")

    param_dtype = dtype or next(iter(local.values())).dtype
    model.to_empty(device="cpu")          # leaving meta makes new Parameters: tie them again, tag their shards
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if tp_group is not None:
        parallel.mark_shards(model)
    model.to(param_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local[name])
    return model


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"to_hf: max_shard_size {size!r} is not a size like 5GB, 200MB or an int of bytes")
    return int(float(m.group(1)) * {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}[m.group(2)])


def to_hf(model: Llama, path, max_shard_size="5GB", pp_group=None) -> None:
    """Write ``model`` as a Hugging Face Llama directory that ``transformers`` loads.

    A sharded model is gathered first: every rank of its TP group must call this (a collective); with
    ``pp_group`` (``model`` is a ``llama.pipeline.LocalModel``) every rank of the PP group too, whose stages are
    gathered to its first rank. With torch.distributed initialised only global rank 0 writes. Files go to a
    temporary directory renamed to ``path`` when complete (an existing ``path`` is replaced only then).
    """
    path = os.fspath(path)
    full = parallel.full_state_dict(model)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        first = dist.get_global_rank(pp_group, 0)
        parts = [None] * dist.get_world_size(pp_group) if dist.get_rank() == first else None
        dist.gather_object(full, parts, dst=first, group=pp_group)
        if dist.get_rank() != first:
            return
        full = {k: v for part in parts for k, v in part.items()}
        order = expected_tensors(model.config)          # the file keeps the model's tensor order
        full = {name: full[name] for name, _ in order.values() if name in full}
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    cfg = model.config
    tensors = {hf_name(n): t.contiguous() for n, t in full.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    dtype = next(iter(tensors.values())).dtype
    limit = _parse_size(max_shard_size)
    shards, cur, cur_bytes = [], {}, 0
    for k, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and cur_bytes + nb > limit:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = t
        cur_bytes += nb
    shards.append(cur)

    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(cfg.to_hf_dict(str(dtype).removeprefix("torch.")), fh, indent=2)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, INDEX_FILE), "w") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rename(path, os.path.join(old, "prev"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
