"""Llama 2 model configuration: one dataclass, named presets, Hugging Face ``config.json`` in and out.

Field names are ours (short); ``from_hf`` / ``to_hf_dict`` map them to and from Hugging Face's
``LlamaConfig`` keys. Presets for the released models use the values of their ``config.json`` on the
Hugging Face Hub (meta-llama/Llama-2-{7b,13b,70b}-hf): 7B and 13B are multi-head (kv heads = heads), 70B
uses grouped-query attention with 8 KV heads; all three use rms_norm_eps 1e-5 and rope_theta 10000.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

# Hugging Face key -> our field name.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings",
}


class ConfigError(ValueError):
    """A configuration that no Llama model can be built from; the message names the field and the rule."""


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self) -> "LlamaConfig":
        """Raise ConfigError naming the first broken rule; return self when valid."""
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "max_seq_len")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"LlamaConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                              f"{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"LlamaConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                              f"{self.num_kv_heads} (grouped-query attention needs whole groups)")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig: head_dim {self.head_dim} (hidden_size / num_heads) must be even "
                              f"for rotary embeddings")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive number, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"LlamaConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        return self

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        """A named configuration: "tiny", "tiny-gqa" (debug sizes, run on CPU in seconds) or "llama2-7b/13b/70b"."""
        try:
            fields = _PRESETS[name]
        except KeyError:
            raise ConfigError(f"LlamaConfig.preset: unknown preset {name!r}; known: {', '.join(_PRESETS)}") from None
        return cls(**fields)

    # ------------------------------------------------------------------ parameter and FLOP counts
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count. exclude_embeddings drops the input embedding and the LM head (unless tied, once)."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * h * 2 + 2 * h * self.kv_dim           # q, o and k, v (no biases)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h                    # + two RMSNorm weights
        body = L * per_layer + h                          # + final norm
        if exclude_embeddings:
            return body
        emb = self.vocab_size * h
        return body + emb + (0 if self.tie_word_embeddings else emb)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_nonembedding (+ the LM head matmul) + attention scores and values.

        Matmul FLOPs counted as 2 per multiply-add, forward + backward = 3x forward (6N). Attention:
        6 * layers * hidden * 2 * seq_len (QK^T and PV, non-causal, no recompute), the convention of the
        PaLM paper's MFU appendix (also used by NxD's llama_perf_estimate); the LM head counts as a
        matmul, the input embedding (a gather) does not.
        """
        n = self.num_params(exclude_embeddings=True) + self.vocab_size * self.hidden_size
        return 6.0 * n + 6.0 * self.num_layers * self.hidden_size * 2 * seq_len

    # ------------------------------------------------------------------ Hugging Face interop
    @classmethod
    def from_hf(cls, path_or_dict) -> "LlamaConfig":
        """From a Hugging Face Llama ``config.json`` (a directory, the file, or the loaded dict)."""
        source = "dict"
        if isinstance(path_or_dict, dict):
            d = path_or_dict
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            source = p
            if not os.path.isfile(p):
                raise FileNotFoundError(f"LlamaConfig.from_hf: no config file at {p}")
            with open(p) as fh:
                try:
                    d = json.load(fh)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"LlamaConfig.from_hf: {p} is not valid JSON: {e}") from None
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"LlamaConfig.from_hf: {source} lacks the required key {key!r}")
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ConfigError(f"LlamaConfig.from_hf: {source} has model_type {mt!r}, expected 'llama'")
        for key, bad in (("attention_bias", True), ("mlp_bias", True)):
            if d.get(key, False) == bad:
                raise ConfigError(f"LlamaConfig.from_hf: {source} sets {key}=true; this Llama has no biases")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"LlamaConfig.from_hf: {source} has hidden_act {d['hidden_act']!r}; only 'silu' "
                              f"(SwiGLU) is supported")
        rs = d.get("rope_scaling")
        if rs and (rs.get("rope_type", rs.get("type")) not in (None, "default")):
            raise ConfigError(f"LlamaConfig.from_hf: {source} uses rope_scaling {rs}; only the default rotary "
                              f"embedding is supported")
        hd = d.get("head_dim")
        if hd is not None and hd != d["hidden_size"] // d["num_attention_heads"]:
            raise ConfigError(f"LlamaConfig.from_hf: {source} has head_dim {hd} != hidden_size / "
                              f"num_attention_heads; only the standard head_dim is supported")
        kw = {}
        for hf_key, ours in _HF_KEYS.items():
            if hf_key in d and d[hf_key] is not None:
                kw[ours] = d[hf_key]
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":     # transformers >= 5
            raise ConfigError(f"LlamaConfig.from_hf: {source} uses rope_parameters {rp}; only the default rotary "
                              f"embedding is supported")
        if "rope_theta" not in kw and isinstance(rp, dict):
            theta = rp.get("rope_theta")
            if theta is not None:
                kw["rope_theta"] = theta
        kw.setdefault("num_kv_heads", kw["num_heads"])
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {source})") from None

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """The Hugging Face ``config.json`` content for this configuration."""
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
             "head_dim": self.head_dim, "use_cache": True, "torch_dtype": torch_dtype, "dtype": torch_dtype,
             "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None}
        for hf_key, ours in _HF_KEYS.items():
            d[hf_key] = getattr(self, ours)
        return d

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


_PRESETS = {
    # Debug sizes: hidden 64, 4 heads of 16, vocab 256: a forward+backward takes milliseconds on CPU.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                 num_kv_heads=4, max_seq_len=128),
    "tiny-gqa": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=128),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, max_seq_len=4096),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                       num_kv_heads=40, max_seq_len=4096),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                       num_kv_heads=8, max_seq_len=4096),
}
PRESETS = tuple(_PRESETS)
