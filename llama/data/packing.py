"""Training samples from indexed datasets: concat-then-split packing, train/valid split, blending, batches.

Packing (Megatron GPTDataset's convention): a split's documents, in a fixed order shuffled once by ``seed``, form
one token stream; sample i is the window ``stream[i*S : i*S + S + 1]`` (S = seq_len), ``input = w[:-1]``,
``labels = w[1:]``. Consecutive windows share one boundary token, so each stream position is an input exactly once
and a label exactly once per epoch; the tail (fewer than S+1 tokens left) is dropped. Documents are cut across
windows and attend to each other (``reset_attention_mask=False``); the EOD token is a target too
(``eod_mask_loss=False``). Several SFT records are packed into one sequence the same way; a source with a loss mask
(``PREFIX.lossmask``, written by ``python -m llama.data --sft``) gets label -100 wherever the mask is 0.

Split: per source, ``round(valid_fraction * documents)`` documents (at least 1 when valid_fraction > 0 and there
are 2 or more) chosen by a seeded permutation form "valid", the rest "train".

Blending: with weights w_j (normalised) and N = sum of the sources' window counts, source j gets N_j windows per
epoch (largest-remainder rounding of w_j * N), spread evenly: its c-th pick sits at time (c + 0.5) / N_j and the
picks of all sources are merged by time (ties: source order). An oversampled source cycles through its windows;
an undersampled one takes evenly spaced windows (the same ones every epoch; the epoch shuffle is the loader's).
Randomness is numpy's PCG64 seeded by ``seed`` (stable for a given numpy version).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from llama.data.checksums import verify_dataset
from llama.data.errors import DataError
from llama.data.indexed import IndexedDataset, split_prefix

IGNORE_INDEX = -100
SPLITS = ("train", "valid")


def _rng(*seed) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(seed)))


class _PackedSource:
    """One indexed dataset's split as a stream of overlapping windows of seq_len + 1 tokens."""

    def __init__(self, prefix: str, seq_len: int, seed: int, split: str, valid_fraction: float, index: int,
                 vocab_size: int | None, verify: str = "fast"):
        self.prefix = split_prefix(os.fspath(prefix))
        verify_dataset(self.prefix, verify)        # recorded checksums (llama.data.checksums), before any read
        self.data = IndexedDataset(self.prefix)
        if vocab_size is not None:
            self.data.check_vocab(vocab_size)
        self.mask = None
        if os.path.exists(self.prefix + ".lossmask.idx"):
            self.mask = IndexedDataset(self.prefix + ".lossmask")
            if not np.array_equal(self.mask.sizes, self.data.sizes):
                raise DataError(f"{self.prefix}.lossmask.idx: document sizes differ from {self.prefix}.idx "
                                f"(the loss mask belongs to other data)")
        n = len(self.data)
        perm = _rng(seed, index).permutation(n)
        n_valid = 0 if valid_fraction <= 0 or n < 2 else min(n - 1, max(1, int(round(valid_fraction * n))))
        self.docs = perm[:n_valid] if split == "valid" else perm[n_valid:]
        lengths = self.data.sizes[self.docs].astype(np.int64)
        self.starts = np.zeros(len(self.docs) + 1, np.int64)
        np.cumsum(lengths, out=self.starts[1:])
        self.num_tokens = int(self.starts[-1])
        self.seq_len = seq_len
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens (and mask) of stream[i*S : i*S + S + 1]."""
        start, need = i * self.seq_len, self.seq_len + 1
        d = int(np.searchsorted(self.starts, start, side="right") - 1)
        toks, masks = [], []
        offset = start - int(self.starts[d])
        while need > 0:
            doc = int(self.docs[d])
            take = min(need, int(self.data.sizes[doc]) - offset)
            if take > 0:
                toks.append(self.data.get_range(doc, offset, take))
                if self.mask is not None:
                    masks.append(self.mask.get_range(doc, offset, take))
                need -= take
            d += 1
            offset = 0
        tokens = np.concatenate(toks).astype(np.int64)
        mask = np.concatenate(masks) if self.mask is not None else None
        return tokens, mask


def blend_index(counts, weights) -> tuple[np.ndarray, np.ndarray]:
    """(source id, window index within the source) of every blended sample; see the module docstring."""
    counts = np.asarray(counts, np.int64)
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    total = int(counts.sum())
    ideal = w * total
    take = np.floor(ideal).astype(np.int64)
    rest = total - int(take.sum())
    if rest:
        order = np.lexsort((np.arange(len(w)), -(ideal - take)))   # largest remainder first, ties by source
        take[order[:rest]] += 1
    take[counts == 0] = 0
    src, pos, times = [], [], []
    for j, (n_j, k_j) in enumerate(zip(counts, take)):
        if k_j == 0:
            continue
        c = np.arange(k_j, dtype=np.int64)
        times.append((c + 0.5) / k_j)
        src.append(np.full(k_j, j, np.int64))
        pos.append(c % n_j if k_j > n_j else (c * n_j) // k_j)
    times, src, pos = np.concatenate(times), np.concatenate(src), np.concatenate(pos)
    order = np.lexsort((src, times))
    return src[order], pos[order]


class PackedDataset:
    """Packed samples of one split of several weighted sources; ``ds[i] -> (input_ids, labels)``, numpy int64 [S].

    ``sources``: ``[(prefix, weight), ...]`` (a bare prefix means weight 1). ``vocab_size``: when given, every
    source's token ids are checked to be below it (DataError naming the file otherwise). ``verify``: how the
    checksums recorded by ``python -m llama.data`` are checked before use (fast | full | off, see
    llama/data/checksums.py).
    """

    def __init__(self, sources, seq_len: int, seed: int = 0, split: str = "train", valid_fraction: float = 0.01,
                 vocab_size: int | None = None, verify: str = "fast"):
        if split not in SPLITS:
            raise ValueError(f"PackedDataset: split must be one of {SPLITS}, got {split!r}")
        if isinstance(sources, (str, os.PathLike)):
            sources = [(sources, 1.0)]
        sources = [(s, 1.0) if isinstance(s, (str, os.PathLike)) else tuple(s) for s in sources]
        if not sources:
            raise DataError("PackedDataset: no sources")
        for prefix, weight in sources:
            if not (isinstance(weight, (int, float)) and weight > 0 and np.isfinite(weight)):
                raise DataError(f"PackedDataset: weight of {prefix} must be a positive number, got {weight!r}")
        if not (isinstance(seq_len, int) and seq_len >= 1):
            raise ValueError(f"PackedDataset: seq_len must be a positive int, got {seq_len!r}")
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"PackedDataset: valid_fraction must be in [0, 1), got {valid_fraction}")
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.sources = [_PackedSource(p, seq_len, seed, split, valid_fraction, j, vocab_size, verify)
                        for j, (p, _) in enumerate(sources)]
        self.weights = [float(w) for _, w in sources]
        counts = [s.num_windows for s in self.sources]
        if sum(counts) == 0:
            detail = ", ".join(f"{s.prefix}: {s.num_tokens} tokens" for s in self.sources)
            raise DataError(f"PackedDataset: the {split} split has no window of seq_len + 1 = {seq_len + 1} tokens "
                            f"({detail})")
        if len(self.sources) == 1:
            self._src = np.zeros(counts[0], np.int64)
            self._pos = np.arange(counts[0], dtype=np.int64)
        else:
            self._src, self._pos = blend_index(counts, self.weights)

    def __len__(self) -> int:
        return len(self._src)

    @property
    def has_loss_mask(self) -> bool:
        return any(s.mask is not None for s in self.sources)

    def source_of(self, i: int) -> int:
        return int(self._src[i])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"PackedDataset: sample {i} out of range ({len(self)} samples)")
        src = self.sources[int(self._src[i])]
        tokens, mask = src.window(int(self._pos[i]))
        labels = tokens[1:].copy()
        if mask is not None:
            labels[mask[1:] == 0] = IGNORE_INDEX
        return tokens[:-1], labels


class BatchLoader:
    """Micro-batches for one data-parallel rank, exactly resumable.

    Each global step uses ``dp_size * micro_batch_size`` consecutive slots of the epoch's permutation of the
    samples (``seed + epoch``); rank r takes slots ``[r * B, (r + 1) * B)`` of them. Call ``next()`` once per
    micro-batch (gradient accumulation = several calls). A step that would not fit in the rest of the epoch starts
    the next epoch (the few samples left are skipped, identically on every rank). ``state_dict()`` is
    ``{epoch, position, seed}`` with position in global sample slots, so it resumes exactly (also with another
    dp_size).
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"BatchLoader: need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                             f"{micro_batch_size}, {dp_rank}, {dp_size}")
        if len(dataset) < micro_batch_size * dp_size:
            raise DataError(f"BatchLoader: {len(dataset)} samples cannot fill one global step of "
                            f"dp_size {dp_size} x micro_batch_size {micro_batch_size}")
        self.dataset, self.micro_batch_size, self.dp_rank, self.dp_size = dataset, micro_batch_size, dp_rank, dp_size
        self.seed, self.epoch, self.position = seed, 0, 0
        self._perm, self._perm_epoch = None, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = _rng(self.seed + self.epoch).permutation(len(self.dataset))
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.micro_batch_size * self.dp_size
        if self.position + step > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.dp_rank * self.micro_batch_size
        idx = self._permutation()[start: start + self.micro_batch_size]
        self.position += step
        pairs = [self.dataset[int(i)] for i in idx]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return inputs, labels

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise DataError(f"BatchLoader.load_state_dict: missing keys {sorted(missing)}")
        if not 0 <= int(state["position"]) <= len(self.dataset):
            raise DataError(f"BatchLoader.load_state_dict: position {state['position']} outside the dataset's "
                            f"{len(self.dataset)} samples (another dataset?)")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._perm_epoch = None
