"""PackedDataset (concat-then-split windows, split, blending, loss masks) and BatchLoader (ranks, resume)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama.data import BatchLoader, DataError, IndexedDatasetWriter, PackedDataset, blend_index


def write(prefix, docs, masks=None, vocab=1 << 20):
    with IndexedDatasetWriter(prefix, vocab_size=vocab) as w:
        for d in docs:
            w.add_document(np.asarray(d, np.int64))
    if masks is not None:
        with IndexedDatasetWriter(prefix + ".lossmask", dtype=np.uint8) as w:
            for m in masks:
                w.add_document(np.asarray(m, np.uint8))
    return prefix


def unique_docs(sizes):
    """Documents whose tokens are their global position: every token identifies its stream position."""
    docs, t = [], 0
    for s in sizes:
        docs.append(list(range(t, t + s)))
        t += s
    return docs


@settings(max_examples=20)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=15), seq_len=st.integers(1, 17),
       seed=st.integers(0, 3))
def test_windows_cover_the_stream_exactly_once(tmp_path_factory, sizes, seq_len, seed):
    total = sum(sizes)
    prefix = write(str(tmp_path_factory.mktemp("p") / "d"), unique_docs(sizes))
    if total < seq_len + 1:
        with pytest.raises(DataError, match="no window of seq_len"):
            PackedDataset([(prefix, 1.0)], seq_len, seed=seed, valid_fraction=0.0)
        return
    ds = PackedDataset([(prefix, 1.0)], seq_len, seed=seed, valid_fraction=0.0)
    assert len(ds) == (total - 1) // seq_len
    # Reference stream: the documents in the source's order, built independently from the doc permutation.
    order = ds.sources[0].docs
    assert sorted(order.tolist()) == list(range(len(sizes)))
    stream = np.concatenate([np.asarray(unique_docs(sizes)[d], np.int64) for d in order] + [np.zeros(0, np.int64)])
    seen_in, seen_lab = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == np.int64 and y.dtype == np.int64 and x.shape == y.shape == (seq_len,)
        np.testing.assert_array_equal(x, stream[i * seq_len: (i + 1) * seq_len])
        np.testing.assert_array_equal(y, stream[i * seq_len + 1: (i + 1) * seq_len + 1])
        seen_in += x.tolist()
        seen_lab += y.tolist()
    n = len(ds) * seq_len
    assert sorted(seen_in) == sorted(stream[:n].tolist())           # each position an input exactly once
    assert sorted(seen_lab) == sorted(stream[1:n + 1].tolist())     # and a label exactly once
    assert total - 1 - n < seq_len                                  # only a short tail is dropped


def test_split_is_disjoint_deterministic_and_complete(tmp_path):
    prefix = write(str(tmp_path / "d"), unique_docs([5] * 200))
    tr = PackedDataset([(prefix, 1)], 4, seed=7, split="train", valid_fraction=0.1)
    va = PackedDataset([(prefix, 1)], 4, seed=7, split="valid", valid_fraction=0.1)
    t, v = set(tr.sources[0].docs.tolist()), set(va.sources[0].docs.tolist())
    assert len(v) == 20 and not t & v and t | v == set(range(200))
    again = PackedDataset([(prefix, 1)], 4, seed=7, split="valid", valid_fraction=0.1)
    assert again.sources[0].docs.tolist() == va.sources[0].docs.tolist()
    other = PackedDataset([(prefix, 1)], 4, seed=8, split="valid", valid_fraction=0.1)
    assert set(other.sources[0].docs.tolist()) != v


def test_loss_mask_becomes_ignore_index(tmp_path):
    docs = [[10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
    masks = [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1]]
    prefix = write(str(tmp_path / "s"), docs, masks)
    ds = PackedDataset(prefix, 5, seed=0, valid_fraction=0.0)
    order = ds.sources[0].docs
    tok = np.concatenate([docs[d] for d in order])
    msk = np.concatenate([masks[d] for d in order])
    for i in range(len(ds)):
        x, y = ds[i]
        w, m = tok[i * 5: i * 5 + 6], msk[i * 5: i * 5 + 6]
        np.testing.assert_array_equal(x, w[:-1])
        np.testing.assert_array_equal(y, np.where(m[1:] == 1, w[1:], -100))
    # Plain data: every label counts (EOD included).
    plain = PackedDataset(write(str(tmp_path / "p"), docs), 5, seed=0, valid_fraction=0.0)
    assert all((plain[i][1] != -100).all() for i in range(len(plain)))


def test_mismatched_loss_mask_is_an_error(tmp_path):
    prefix = write(str(tmp_path / "s"), [[1, 2, 3]], [[0, 1]])
    with pytest.raises(DataError, match=r"s\.lossmask\.idx: document sizes differ"):
        PackedDataset(prefix, 2, seed=0, valid_fraction=0.0)


def test_token_ids_beyond_vocab(tmp_path):
    prefix = write(str(tmp_path / "d"), [[1, 2, 3], [4, 500]])
    PackedDataset(prefix, 2, valid_fraction=0.0, vocab_size=501)
    with pytest.raises(DataError, match=r"d\.bin: token id 500 in sequence 1 is outside the vocabulary"):
        PackedDataset(prefix, 2, valid_fraction=0.0, vocab_size=500)


@settings(max_examples=20)
@given(counts=st.lists(st.integers(1, 300), min_size=2, max_size=4),
       weights=st.lists(st.floats(0.05, 5.0), min_size=4, max_size=4))
def test_blend_proportions(counts, weights):
    weights = weights[: len(counts)]
    src, pos = blend_index(counts, weights)
    total = sum(counts)
    assert len(src) == total
    share = np.asarray(weights) / sum(weights)
    got = np.bincount(src, minlength=len(counts))
    assert np.all(np.abs(got - share * total) < 1.0 + 1e-9)                 # largest-remainder rounding
    for prefix_len in (total // 3, total // 2, total):                    # evenly interleaved, not in blocks
        part = np.bincount(src[:prefix_len], minlength=len(counts))
        assert np.all(np.abs(part - share * prefix_len) <= len(counts) + 1)
    for j, n in enumerate(counts):
        p = pos[src == j]
        assert p.min() >= 0 and p.max() < n
        if got[j] <= n:
            assert len(set(p.tolist())) == got[j]                          # undersampled: no repeats


def test_blended_dataset_draws_from_each_source(tmp_path):
    a = write(str(tmp_path / "a"), [[1] * 100] * 10)
    b = write(str(tmp_path / "b"), [[2] * 100] * 10)
    ds = PackedDataset([(a, 3.0), (b, 1.0)], 9, seed=0, valid_fraction=0.0)
    firsts = np.array([ds[i][0][0] for i in range(len(ds))])
    frac = (firsts == 1).mean()
    assert abs(frac - 0.75) < 0.01
    with pytest.raises(DataError, match="weight of .* must be a positive number"):
        PackedDataset([(a, 0.0), (b, 1.0)], 9)


def make_loader_data(tmp_path, n_docs=37):
    return PackedDataset(write(str(tmp_path / "d"), unique_docs([7] * n_docs)), 6, seed=1, valid_fraction=0.0)


def test_dp_ranks_take_disjoint_slices_and_epoch_covers_all(tmp_path):
    ds = make_loader_data(tmp_path)
    n = len(ds)
    B, dp = 2, 3
    loaders = [BatchLoader(ds, B, r, dp, seed=5) for r in range(dp)]
    steps = n // (B * dp)
    seen = []
    for _ in range(steps):
        for ld in loaders:
            x, y = ld.next()
            assert x.shape == (B, 6) and x.dtype == torch.int64 and y.dtype == torch.int64
            seen += [int(r[0]) for r in x]          # the first token identifies the window
    assert len(seen) == len(set(seen)) == steps * B * dp
    # Next step crosses into epoch 1 with a new permutation.
    x0, _ = loaders[0].next()
    assert loaders[0].state_dict()["epoch"] == 1
    fresh = BatchLoader(ds, B, 0, dp, seed=5)
    assert not torch.equal(x0, fresh.next()[0]) or n < 4


def test_resume_equals_uninterrupted(tmp_path):
    ds = make_loader_data(tmp_path)
    ref = BatchLoader(ds, 4, 0, 1, seed=3)
    batches = [ref.next() for _ in range(25)]                   # several epochs
    a = BatchLoader(ds, 4, 0, 1, seed=3)
    for _ in range(11):
        a.next()
    state = a.state_dict()
    assert set(state) == {"epoch", "position", "seed"}
    b = BatchLoader(ds, 4, 0, 1, seed=99)
    b.load_state_dict(state)
    for i in range(11, 25):
        x, y = b.next()
        assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1])
    with pytest.raises(DataError, match="missing keys"):
        b.load_state_dict({"epoch": 0})


def test_loader_needs_one_full_step(tmp_path):
    ds = make_loader_data(tmp_path, n_docs=3)
    with pytest.raises(DataError, match="cannot fill one global step"):
        BatchLoader(ds, 8, 0, 2)
