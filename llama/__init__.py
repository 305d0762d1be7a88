"""Llama 2 for training: config, model, tensor parallelism (``llama.parallel``), Hugging Face interop.

    from llama import Llama, LlamaConfig, from_hf, to_hf
    model = Llama(LlamaConfig.preset("tiny"))
    logits = model(input_ids)                        # [B, S, V]
    loss = model(input_ids, labels=labels)           # labels already shifted, -100 ignored
"""
import importlib

# Lazy (PEP 562): `python -m llama.data` must not pay torch's import time; names load on first access.
_LAZY = {"parallel": "llama.parallel", "ConfigError": "llama.config", "LlamaConfig": "llama.config",
         "CheckpointError": "llama.hf", "from_hf": "llama.hf", "to_hf": "llama.hf",
         "IGNORE_INDEX": "llama.model", "Llama": "llama.model", "ParallelError": "llama.parallel"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'llama' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "parallel" else getattr(module, name)      # "parallel" is the submodule itself
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["CheckpointError", "ConfigError", "IGNORE_INDEX", "Llama", "LlamaConfig", "ParallelError", "from_hf",
           "parallel", "to_hf"]
