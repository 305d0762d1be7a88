"""Llama 2 for training: config, model, tensor parallelism (``llama.parallel``), Hugging Face interop.

    from llama import Llama, LlamaConfig, from_hf, to_hf
    model = Llama(LlamaConfig.preset("tiny"))
    logits = model(input_ids)                        # [B, S, V]
    loss = model(input_ids, labels=labels)           # labels already shifted, -100 ignored
"""
from llama import parallel
from llama.config import ConfigError, LlamaConfig
from llama.hf import CheckpointError, from_hf, to_hf
from llama.model import IGNORE_INDEX, Llama
from llama.parallel import ParallelError

__all__ = ["CheckpointError", "ConfigError", "IGNORE_INDEX", "Llama", "LlamaConfig", "ParallelError", "from_hf",
           "parallel", "to_hf"]
