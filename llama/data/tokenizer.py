"""Sentencepiece tokenizers: a user's Llama 2 ``tokenizer.model``, or one trained here with Llama 2's settings.

Llama 2's tokenizer (sentencepiece BPE, 32000 pieces) was trained with byte fallback, digits split into single
pieces, unk=0 bos=1 eos=2 and no pad id, identity normalisation (no NFKC), a dummy prefix space and whitespace
kept as is; ``train_tokenizer`` uses the same settings at any vocabulary size. The vocabulary size is recorded in a
sidecar JSON (``<model>.json``: path, vocab size, sha256) and ``check_vocab`` compares it with the model config.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sentencepiece as spm

from llama.data.errors import DataError
from llama.data.reading import iter_jsonl_texts, iter_text_file

# Llama 2's special ids.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
# Byte fallback needs 256 byte pieces plus the 3 specials; BPE needs room for merges on top.
MIN_VOCAB_SIZE = 256 + 3 + 16
# Sentencepiece trains on lines; at most this many are fed (the first ones, in order: deterministic).
MAX_TRAINING_LINES = 2_000_000


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A sentencepiece model. ``path`` is the ``.model`` file or a folder holding ``tokenizer.model`` (HF layout)."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such tokenizer file (expected a sentencepiece .model)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(),
                                                              self.sp.unk_id())

    # Megatron calls the document separator "eod"; for Llama it is the eos token.
    @property
    def eod_id(self) -> int:
        return self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def meta(self) -> dict:
        return {"tokenizer": os.path.abspath(self.path), "vocab_size": self.vocab_size,
                "tokenizer_sha256": sha256_file(self.path), "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "unk_id": self.unk_id}


def _lines(texts_or_files, max_lines: int):
    """Non-blank lines, the first max_lines. A path (or a list/tuple of existing paths) names files (``.jsonl``:
    their ``text`` field); any other iterable yields texts."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    files = isinstance(texts_or_files, (list, tuple)) and texts_or_files and all(
        isinstance(x, (str, os.PathLike)) and os.path.isfile(x) for x in texts_or_files)
    if files:
        texts = itertools.chain.from_iterable(
            iter_jsonl_texts(os.fspath(p), "text") if os.fspath(p).endswith((".jsonl", ".json"))
            else iter_text_file(os.fspath(p)) for p in texts_or_files)
    else:
        texts = texts_or_files
    count = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
                count += 1
                if count >= max_lines:
                    return


def train_tokenizer(texts_or_files, vocab_size: int, model_prefix: str, max_lines: int = MAX_TRAINING_LINES) -> str:
    """Train a sentencepiece BPE model with Llama 2's settings; returns ``model_prefix + ".model"``.

    ``texts_or_files``: texts, or paths of text / JSONL files. Written under a temporary name and renamed, with a
    sidecar ``<model_prefix>.json`` holding the vocabulary size and the model's sha256.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"train_tokenizer: vocab_size {vocab_size} is below {MIN_VOCAB_SIZE} (256 byte-fallback "
                        f"pieces + 3 special ids + room for merges)")
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    lines = list(_lines(texts_or_files, max_lines))
    if not lines:
        raise DataError(f"train_tokenizer: empty corpus (no non-blank line) for {model_prefix}.model")
    tmp = f"{model_prefix}.tmp-{os.getpid()}"
    spm.set_random_generator_seed(1234)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines), model_prefix=tmp, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, character_coverage=0.99995, max_sentence_length=16384,
            split_by_unicode_script=True, split_by_number=True, input_sentence_size=0,
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp + ext):
                os.unlink(tmp + ext)
        raise DataError(f"train_tokenizer: sentencepiece failed for {model_prefix}.model: {e}") from None
    os.replace(tmp + ".vocab", model_prefix + ".vocab")
    os.replace(tmp + ".model", model_prefix + ".model")
    tok = Tokenizer(model_prefix + ".model")
    write_json_atomic(model_prefix + ".json", tok.meta())
    return model_prefix + ".model"


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _vocab_of(tokenizer_or_meta) -> tuple[int, str]:
    """(vocab size, where it came from) of a Tokenizer, a meta dict, a .model, a meta .json or a dataset prefix."""
    if isinstance(tokenizer_or_meta, Tokenizer):
        return tokenizer_or_meta.vocab_size, tokenizer_or_meta.path
    if isinstance(tokenizer_or_meta, dict):
        if "vocab_size" not in tokenizer_or_meta:
            raise DataError(f"check_vocab: metadata has no 'vocab_size': {sorted(tokenizer_or_meta)}")
        return int(tokenizer_or_meta["vocab_size"]), tokenizer_or_meta.get("tokenizer", "metadata")
    if isinstance(tokenizer_or_meta, int):
        return tokenizer_or_meta, "given vocab size"
    path = os.fspath(tokenizer_or_meta)
    for candidate in (path, path + ".meta.json"):
        if candidate.endswith(".json") and os.path.isfile(candidate):
            with open(candidate) as f:
                meta = json.load(f)
            if "vocab_size" not in meta:
                raise DataError(f"{candidate}: no 'vocab_size' field")
            return int(meta["vocab_size"]), candidate
    return Tokenizer(path).vocab_size, path


def check_vocab(tokenizer_or_meta, config_vocab_size: int) -> int:
    """The tokenizer's vocabulary size, after checking that the model config can embed every id.

    A config larger than the tokenizer is allowed (padded vocabularies, e.g. to a multiple of the TP size);
    a smaller one is a DataError naming both sizes.
    """
    vocab, source = _vocab_of(tokenizer_or_meta)
    if config_vocab_size < vocab:
        raise DataError(f"vocabulary mismatch: the tokenizer ({source}) has {vocab} ids but the model config's "
                        f"vocab_size is {config_vocab_size}; set vocab_size >= {vocab}")
    return vocab
