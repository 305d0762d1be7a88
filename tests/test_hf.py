"""Hugging Face interop: parity with transformers' LlamaForCausalLM, bit-identical round trips, bad checkpoints.

Reference: transformers.LlamaForCausalLM (random init, fp32, eager attention) saved with save_pretrained and
loaded with llama.from_hf. Logits and every gradient agree within 1e-5 relative (max |a-b| / max |b|).
HF shifts labels inside its loss; ours are pre-shifted, so our labels[:, t] = hf_labels[:, t + 1].
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import llama
from llama import CheckpointError, ConfigError
from llama.hf import hf_name

RTOL = 1e-5


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _hf_model(num_kv_heads=4, tie=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=num_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-6,
                   rope_theta=5000.0, tie_word_embeddings=tie, attn_implementation="eager", **kw)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():                       # non-trivial norm weights, so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def _batch(seed=0, b=2, s=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, s), generator=g)
    hf_labels = torch.randint(0, 256, (b, s), generator=g)
    hf_labels[0, 3:7] = -100
    ours = torch.cat([hf_labels[:, 1:], torch.full((b, 1), -100)], dim=1)
    return ids, hf_labels, ours


def _all_tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("num_kv_heads,tie", [(4, False), (2, False), (1, True)])
def test_logits_and_grads_match_transformers(tmp_path, num_kv_heads, tie):
    hf = _hf_model(num_kv_heads, tie)
    ours = llama.from_hf(_save(hf, tmp_path / "hf"))
    assert ours.config.num_kv_heads == num_kv_heads and ours.config.rope_theta == 5000.0
    ids, hf_labels, labels = _batch()
    out = hf(ids, labels=hf_labels)
    out.loss.backward()
    logits = ours(ids)
    assert _rel(logits, out.logits) <= RTOL
    loss = ours(ids, labels=labels)
    assert _rel(loss, out.loss) <= RTOL
    loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert _rel(p.grad, hf_params[hf_name(name)].grad) <= RTOL, name


def test_sum_reduction_and_ignored_tokens(tmp_path):
    ours = llama.from_hf(_save(_hf_model(2), tmp_path / "hf"))
    ids, _, labels = _batch(1)
    logits = ours(ids).double()
    valid = labels != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ref_sum = nll[valid].sum()
    assert abs(ours(ids, labels=labels, reduction="sum").item() - ref_sum.item()) <= 1e-5 * ref_sum.item()
    assert abs(ours(ids, labels=labels).item() - (ref_sum / valid.sum()).item()) <= 1e-5 * ref_sum.item()
    # Changing the token at an ignored position's label changes nothing.
    labels2 = labels.clone()
    labels2[0, 4] = -100
    labels3 = labels2.clone()
    assert torch.equal(ours(ids, labels=labels2, reduction="sum"), ours(ids, labels=labels3, reduction="sum"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical_and_loadable(tmp_path, dtype):
    hf = _hf_model(2).to(dtype)
    src = _save(hf, tmp_path / "hf")
    model = llama.from_hf(src)
    assert next(model.parameters()).dtype == dtype
    llama.to_hf(model, tmp_path / "out")
    a, b = _all_tensors(src), _all_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    original = LlamaForCausalLM.from_pretrained(src, attn_implementation="eager")
    ids = _batch()[0]
    assert torch.equal(reloaded(ids).logits, original(ids).logits)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]


def test_multi_shard_in_and_out(tmp_path):
    hf = _hf_model(2)
    src = _save(hf, tmp_path / "hf", max_shard_size="50KB")
    assert os.path.isfile(src / "model.safetensors.index.json")
    model = llama.from_hf(src)
    ids = _batch()[0]
    assert _rel(model(ids), hf(ids).logits) <= RTOL
    llama.to_hf(model, tmp_path / "out", max_shard_size="50KB")
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    a, b = _all_tensors(src), _all_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = llama.from_hf(tmp_path / "out")
    assert torch.equal(again(ids), model(ids))
    # Overwriting an existing export replaces it whole.
    llama.to_hf(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    src = _save(_hf_model(2), tmp_path / "hf")
    cfg = json.load(open(src / "config.json"))
    cfg["intermediate_size"] = 192
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight in .*model\.safetensors "
                                              r"has shape \(176, 64\), but config\.json implies \(192, 64\)"):
        llama.from_hf(src)


def test_missing_shard_and_tensor(tmp_path):
    src = _save(_hf_model(2), tmp_path / "hf", max_shard_size="50KB")
    index = json.load(open(src / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(src / victim)
    with pytest.raises(CheckpointError, match=f"missing: .*{victim}"):
        llama.from_hf(src)
    src2 = _save(_hf_model(2), tmp_path / "hf2", max_shard_size="50KB")
    index = json.load(open(src2 / "model.safetensors.index.json"))
    del index["weight_map"]["model.layers.1.self_attn.v_proj.weight"]
    json.dump(index, open(src2 / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match="lacks tensor.*model.layers.1.self_attn.v_proj.weight"):
        llama.from_hf(src2)


def test_bad_config_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        llama.from_hf(tmp_path)
    src = _save(_hf_model(2), tmp_path / "hf")
    os.remove(src / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        llama.from_hf(src)
    cfg = json.load(open(src / "config.json"))
    cfg["num_key_value_heads"] = 3
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(ConfigError, match="num_heads 4 is not a multiple of num_kv_heads 3.*config.json"):
        llama.from_hf(src)
