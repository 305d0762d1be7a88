"""``nki.collectives`` for the interpreter: collectives over a replica group of ranks.

The interpreter runs one kernel instance on one NeuronCore, i.e. one rank (rank id 0). A collective over a group
in which every rank list holds only this rank is well defined and executed exactly: all_reduce / all_gather /
reduce_scatter / all_to_all / collective_permute of a one-rank group copy each source into its destination
(DMA, traced). A group with more than one rank needs other ranks' data and is refused with rule
``collectives.ranks`` (the interpreter has no peer to exchange with).
"""
from dataclasses import dataclass as _dataclass, field as _field

from . import isa as _isa
from . import target as _target
from .errors import ConstraintError as _ConstraintError
from .objects import NKIObject as _NKIObject


@_dataclass
class ReplicaGroup(_NKIObject):
    """Groups of ranks that take part in a collective; sub-groups must not overlap. ``replica_groups`` is a list
    of rank lists (``[[0]]`` for this single rank)."""
    replica_groups: list = _field(default_factory=lambda: [[0]])


def _single_rank(replica_group, what):
    groups = getattr(replica_group, "replica_groups", replica_group)
    try:
        ranks = [int(r) for g in groups for r in g]
    except TypeError:
        raise _ConstraintError(f"rule collectives.group: {what} replica_group {replica_group!r} is not a "
                               "ReplicaGroup of rank lists") from None
    if ranks != [0]:
        raise _ConstraintError(f"rule collectives.ranks: {what} over ranks {ranks}; the interpreter runs a single "
                               "rank (0) and has no peer to exchange data with (limit 1 rank)")


def _copy_all(srcs, dsts, what):
    if len(srcs) != len(dsts):
        raise _ConstraintError(f"rule collectives.lists: {what} has {len(srcs)} srcs but {len(dsts)} dsts")
    for s, d in zip(srcs, dsts):
        _isa.dma_copy(d, s, name=what)


def all_reduce(srcs, dsts, replica_group, op, priority=None, name=None):
    _single_rank(replica_group, "all_reduce")
    _copy_all(srcs, dsts, name or "all_reduce")


def all_gather(srcs, dsts, replica_group, collective_dim, priority=None, name=None):
    _single_rank(replica_group, "all_gather")
    _copy_all(srcs, dsts, name or "all_gather")


def reduce_scatter(srcs, dsts, replica_group, collective_dim, op, priority=None, name=None):
    _single_rank(replica_group, "reduce_scatter")
    _copy_all(srcs, dsts, name or "reduce_scatter")


def all_to_all(srcs, dsts, replica_group, collective_dim, priority=None, name=None):
    _single_rank(replica_group, "all_to_all")
    _copy_all(srcs, dsts, name or "all_to_all")


def all_to_all_v(srcs, dsts, replica_group, metadata_tensor, recv_counts_known=False, has_rdispls=False,
                 priority=None, name=None):
    _single_rank(replica_group, "all_to_all_v")
    raise _ConstraintError("rule collectives.all_to_all_v: the docs require LNC=2 and more than one device")


def all_gather_v(srcs, dsts, replica_group, metadata_tensor, recv_counts_known=False, has_rdispls=False,
                 priority=None, name=None):
    # new in NKI 0.6 (SDK 2.32 release notes); its page: "relevant for Trn2, Trn3"
    _target.require(3, "all_gather_v", "collective")
    _single_rank(replica_group, "all_gather_v")
    raise NotImplementedError("nki.collectives.all_gather_v (NeuronCore-v3+) is not simulated by kernels.sim")


def collective_permute(srcs, dsts, source_target_pairs, priority=None, name=None):
    pairs = [tuple(int(x) for x in p) for p in source_target_pairs]
    if any(p != (0, 0) for p in pairs):
        raise _ConstraintError(f"rule collectives.ranks: collective_permute pairs {pairs} name other ranks; the "
                               "interpreter runs a single rank (0) (limit 1 rank)")
    _copy_all(srcs, dsts, name or "collective_permute")


def collective_permute_implicit(srcs_by_channel, dsts_by_channel, replica_group, channel_ids=[0], priority=None,
                                name=None):
    _single_rank(replica_group, "collective_permute_implicit")
    for s, d in zip(srcs_by_channel, dsts_by_channel):
        _copy_all(s, d, name or "collective_permute_implicit")


def collective_permute_implicit_reduce(srcs0_by_channel, srcs1_by_channel, dsts_by_channel, replica_group, op,
                                       channel_ids=[0], priority=None, name=None):
    _single_rank(replica_group, "collective_permute_implicit_reduce")
    raise _ConstraintError("rule collectives.ranks: collective_permute_implicit_reduce sends to a ring successor; "
                           "a single rank has none")


def collective_permute_implicit_current_processing_rank_id(iteration_id, replica_group, channel_id=0, name=None):
    _single_rank(replica_group, "collective_permute_implicit_current_processing_rank_id")
    return _isa.VirtualRegister(0)


def rank_id(name=None):
    return _isa.VirtualRegister(0)
