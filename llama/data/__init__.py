"""Data pipeline: tokenizer, Megatron indexed datasets, packing, SFT, the embedded default corpus.

    python -m llama.data --input F.jsonl --output-prefix P (--tokenizer PATH | --train-tokenizer --vocab-size N)

    from llama.data import PackedDataset, BatchLoader, prepare_default_data
    data = prepare_default_data("~/.cache/llama-trn/data")          # no download
    ds = PackedDataset(data["sources"], seq_len=128, seed=0)
    loader = BatchLoader(ds, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)
    input_ids, labels = loader.next()                               # [B, S] int64, labels -100 where no loss
"""
from llama.data.default_corpus import DEFAULT_VOCAB_SIZE, prepare_default_data, qnli_records
from llama.data.errors import DataError
from llama.data.indexed import IndexedDataset, IndexedDatasetWriter
from llama.data.packing import IGNORE_INDEX, BatchLoader, PackedDataset, blend_index
from llama.data.prepare import prepare
from llama.data.sft import DEFAULT_PROMPT_TEMPLATE, format_qnli
from llama.data.tokenizer import Tokenizer, check_vocab, train_tokenizer

__all__ = ["BatchLoader", "DEFAULT_PROMPT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "DataError", "IGNORE_INDEX",
           "IndexedDataset", "IndexedDatasetWriter", "PackedDataset", "Tokenizer", "blend_index", "check_vocab",
           "format_qnli", "prepare", "prepare_default_data", "qnli_records", "train_tokenizer"]
