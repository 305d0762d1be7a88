"""LlamaConfig: presets, validation errors, Hugging Face config.json in and out, parameter and FLOP counts."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama import ConfigError, LlamaConfig


def test_presets_match_published_sizes():
    # Parameter counts of meta-llama/Llama-2-{7b,13b,70b}-hf (safetensors metadata on the Hub).
    assert LlamaConfig.preset("llama2-7b").num_params() == 6_738_415_616
    assert LlamaConfig.preset("llama2-13b").num_params() == 13_015_864_320
    assert LlamaConfig.preset("llama2-70b").num_params() == 68_976_648_192
    c70 = LlamaConfig.preset("llama2-70b")
    assert (c70.num_kv_heads, c70.head_dim) == (8, 128)
    assert LlamaConfig.preset("tiny-gqa").num_kv_heads < LlamaConfig.preset("tiny-gqa").num_heads
    with pytest.raises(ConfigError, match="unknown preset 'llama2-7'"):
        LlamaConfig.preset("llama2-7")


def test_flops_per_token_7b():
    # field notes: 6 N_nonembed + 6 L H (2 S) ~ 46.1 GFLOP/token at seq 4096 (LM head counted as a matmul).
    c = LlamaConfig.preset("llama2-7b")
    n = c.num_params(exclude_embeddings=True) + c.vocab_size * c.hidden_size
    assert c.flops_per_token(4096) == 6 * n + 6 * 32 * 4096 * 2 * 4096
    assert abs(c.flops_per_token(4096) / 1e9 - 46.1) < 0.1


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=65), "hidden_size 65 is not divisible by num_heads 4"),
    (dict(num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(num_layers=2.0), "num_layers must be a positive integer"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
    (dict(hidden_size=12, num_heads=4, num_kv_heads=4), "head_dim 3 .* must be even"),
])
def test_validation_errors(changes, message):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=4)
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**dict(base, **changes))


@given(heads=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([8, 16, 32]),
       tie=st.booleans(), theta=st.floats(100, 1e6))
def test_hf_dict_round_trip(heads, group, d, tie, theta):
    if heads % group:
        return
    c = LlamaConfig(vocab_size=300, hidden_size=heads * d, intermediate_size=3 * d, num_layers=3, num_heads=heads,
                    num_kv_heads=heads // group, rope_theta=theta, tie_word_embeddings=tie)
    assert LlamaConfig.from_hf(c.to_hf_dict()) == c


def test_from_transformers_config(tmp_path):
    from transformers import LlamaConfig as HFConfig
    hf = HFConfig(vocab_size=300, hidden_size=64, intermediate_size=100, num_hidden_layers=3, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=77, rms_norm_eps=1e-6, rope_theta=1234.0)
    hf.save_pretrained(tmp_path)
    c = LlamaConfig.from_hf(tmp_path)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.max_seq_len, c.rms_norm_eps, c.rope_theta) == (300, 64, 100, 3, 8, 2, 77, 1e-6, 1234.0)
    assert LlamaConfig.from_hf(tmp_path / "config.json") == c


def test_from_hf_rejects_what_it_cannot_run(tmp_path):
    good = LlamaConfig.preset("tiny").to_hf_dict()
    for change, msg in [(dict(model_type="mistral"), "model_type 'mistral'"),
                        (dict(attention_bias=True), "attention_bias=true"),
                        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
                        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
                        (dict(rope_parameters={"rope_type": "yarn"}), "rope_parameters")]:
        with pytest.raises(ConfigError, match=msg):
            LlamaConfig.from_hf(dict(good, **change))
    d = dict(good)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="lacks the required key 'hidden_size'"):
        LlamaConfig.from_hf(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(good, num_key_value_heads=3)))
    with pytest.raises(ConfigError, match="num_kv_heads 3.*from .*config.json"):
        LlamaConfig.from_hf(tmp_path)
