"""Measure the peak memory of a few training steps on CPU, for tests/test_plan.py (run as a script in a fresh process).

    python tests/plan_measure.py '{"cfg": {...}, "batch": 4, "seq": 128, "accum": 1, "ac": "none"}'

prints JSON {"peak": bytes}: the peak resident set size during two optimizer steps (fp32 AdamW foreach, the
trainer's loss normalisation) minus the resident size just before the model is built. The caller sets
MALLOC_MMAP_THRESHOLD_ so that glibc serves every large tensor with its own mmap and returns it on free: the
resident size then follows the live tensor bytes instead of the heap's high-water mark.
"""
import json
import resource
import sys

import torch

from llama import Llama, LlamaConfig
from llama import parallel as P


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def hwm() -> int:
    """Peak resident size of this process image (VmHWM). Not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child spawned by a large pytest process would report the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def steps(cfg, batch, seq, accum, ac, n_steps=2, seed=0):
    torch.manual_seed(seed)
    model = P.apply_activation_checkpointing(Llama(cfg), ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
             torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)) for _ in range(accum)]
    for _ in range(n_steps):
        n_valid = sum(int((lbl != -100).sum()) for _, lbl in data)
        for ids, lbl in data:
            (model(ids, labels=lbl, reduction="sum") / n_valid).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    tiny = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=2, max_seq_len=16)
    steps(tiny, 1, 8, 1, spec["ac"], n_steps=1)          # load every kernel's code pages before the baseline
    base = rss()
    steps(LlamaConfig(**spec["cfg"]), spec["batch"], spec["seq"], spec["accum"], spec["ac"])
    peak = hwm()
    print(json.dumps({"peak": peak - base}))


if __name__ == "__main__":
    main()
