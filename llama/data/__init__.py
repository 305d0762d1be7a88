"""Data pipeline: tokenizer, Megatron indexed datasets, packing, SFT, the embedded default corpus.

    python -m llama.data --input F.jsonl --output-prefix P (--tokenizer PATH | --train-tokenizer --vocab-size N)

    from llama.data import PackedDataset, BatchLoader, prepare_default_data
    data = prepare_default_data("~/.cache/llama-trn/data")          # no download
    ds = PackedDataset(data["sources"], seq_len=128, seed=0)
    loader = BatchLoader(ds, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)
    input_ids, labels = loader.next()                               # [B, S] int64, labels -100 where no loss
"""
import importlib

from llama.data.default_corpus import DEFAULT_VOCAB_SIZE, prepare_default_data, qnli_records
from llama.data.errors import DataError
from llama.data.indexed import IndexedDataset, IndexedDatasetWriter
from llama.data.prepare import prepare
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE, format_qnli
from llama.data.tokenizer import Tokenizer, check_vocab, train_tokenizer

# Lazy (PEP 562): only packing needs torch, so the preparation CLI and tokenizer/indexed users never import it.
_LAZY_PACKING = ("BatchLoader", "IGNORE_INDEX", "PackedDataset", "blend_index")


def __getattr__(name):
    if name not in _LAZY_PACKING:
        raise AttributeError(f"module 'llama.data' has no attribute {name!r}")
    value = getattr(importlib.import_module("llama.data.packing"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_PACKING))


__all__ = ["BatchLoader", "DEFAULT_PROMPT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "DataError", "IGNORE_INDEX",
           "IndexedDataset", "IndexedDatasetWriter", "PackedDataset", "Tokenizer", "blend_index", "check_vocab",
           "format_qnli", "prepare", "prepare_default_data", "qnli_records", "train_tokenizer"]
