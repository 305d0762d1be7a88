"""Llama 2, top to bottom: embedding, decoder layers (RMSNorm, attention with RoPE and GQA, SwiGLU MLP),
final norm, LM head, loss.

Module names follow Hugging Face's LlamaForCausalLM (``embed_tokens``, ``layers[i].self_attn.q_proj`` ...,
``norm``, ``lm_head``) so checkpoint conversion is a plain name map (``llama/hf.py``). q/k/v and gate/up
stay separate linears: fused layouts are what broke converters in other trainers.

There is no tensor-parallel code here. ``llama.parallel.parallelize`` shards the linears in place and
swaps a few modules (embedding, the norms' outputs, LM head, loss) for parallel versions. That works
because this file never hard-codes a head count or a vocabulary size in its forward: head counts are
read from tensor shapes, and the loss (which applies the LM head) and the logits gather are attributes
(``loss_fn``, ``logits_out``).

Numerics: RMSNorm, RoPE, SwiGLU and attention are ``kernels.ops`` (fp32 statistics / softmax inside,
see kernels/reference.py). cos/sin are computed once per forward in fp32 with Hugging Face's formula
and cast to the activation dtype, as Hugging Face does.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from llama.config import LlamaConfig
from llama.loss import IGNORE_INDEX, LinearCrossEntropy


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [S, head_dim] for positions 0..S-1 (Hugging Face's default rotary embedding).

    inv_freq is recomputed in fp32 at every call (head_dim / 2 numbers) rather than kept as a buffer, so
    casting the model to bf16 cannot round it (a buffer would be cast with the parameters).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, seq_len: int, dtype: torch.dtype, device=None):
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)                          # [S, D/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)                     # rotate-half layout
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def core(self, q, k, v, cos, sin):
        """Rotary embedding and causal attention on [B, heads, S, D]; the selective-checkpoint region."""
        q, k = ops.apply_rope(q, k, cos, sin)
        return ops.flash_attention(q, k, v, causal=True)

    def forward(self, x, cos, sin):
        # Head counts come from the projections' widths, so a sharded layer (fewer local heads) runs as is; sizes
        # are explicit (no -1) so that an empty batch gives empty outputs as every op does.
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = self.core(q, k, v, cos, sin)                       # [B, Hq, S, D], GQA handled by the op
        b, hq, s, d = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, hq * d))

    def _heads(self, t):
        """[B, S, heads * D] -> [B, heads, S, D]."""
        b, s, width = t.shape
        return t.view(b, s, width // self.head_dim, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def activation(self, gate, up):
        """SwiGLU and the down projection; the MLP selective-checkpoint region."""
        return self.down_proj(ops.swiglu(gate, up))

    def forward(self, x):
        return self.activation(self.gate_proj(x), self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.logits_out = nn.Identity()      # parallelize: gathers vocab shards into full logits
        self.loss_fn = LinearCrossEntropy()  # LM head + loss; parallelize: vocab-parallel cross-entropy
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Hugging Face's initialisation: normal(0, initializer_range) for linears and the embedding, norms 1."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def forward(self, input_ids, labels=None, reduction="mean"):
        """input_ids [B, S] -> logits [B, S, V]; with labels [B, S] (already shifted) -> scalar loss."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1], h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        if labels is None:
            return self.logits_out(self.lm_head(h))
        # The loss applies the LM head itself, so it can avoid materialising all logits (llama/loss.py).
        return self.loss_fn(h, self.lm_head.weight, labels, reduction=reduction)
