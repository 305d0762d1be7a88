"""nisa instructions of newer NeuronCores, with their official signatures: each refuses an older target with
rule ``platform`` (as the hardware does not have it) and, on its generation, raises NotImplementedError (the
interpreter does not simulate it yet). Generations from the pages' "Available only on NeuronCore-vN" notes."""
from . import ops as _ops
from . import target
from .isa import engine, reduce_cmd, dma_engine   # isa imports this module last, after defining its enums

_FP32_MIN = -3.4028234663852886e+38


def _newer(name, generation):
    target.require(generation, name)
    raise NotImplementedError(f"nisa.{name} (NeuronCore-v{generation}+) is not simulated by kernels.sim")


def activate2(dst, op, data, imm0, imm1, op0, op1, relu_param=0.0, reverse0=False, reverse1=False, reduce_op=None,
              reduce_res=None, reduce_cmd=reduce_cmd.idle, name=None):
    _newer("activate2", 4)


def exponential(dst, src, max_value=0.0, reduce_res=None, reduce_cmd=reduce_cmd.idle, reduce_init=0.0, name=None):
    _newer("exponential", 4)


def nc_matmul_mx(dst, stationary, moving, stationary_scale, moving_scale, tile_position=None, tile_size=None,
                 accumulate=None, name=None):
    _newer("nc_matmul_mx", 4)


def quantize_mx(dst, src, dst_scale, name=None):
    _newer("quantize_mx", 4)


def rand2(dst, min, max, name=None):
    _newer("rand2", 4)


def range_select(dst, on_true_tile, comp_op0, comp_op1, bound0, bound1, reduce_cmd=reduce_cmd.reset_reduce,
                 reduce_res=None, reduce_op=_ops.BINARY["maximum"], range_start=0, on_false_value=_FP32_MIN, name=None):
    _newer("range_select", 3)


def rand_get_state(dst, engine=engine.unknown, name=None):
    _newer("rand_get_state", 3)


def rand_set_state(src_seeds, engine=engine.unknown, name=None):
    _newer("rand_set_state", 3)


def core_barrier(data, cores, engine=engine.gpsimd, name=None):
    _newer("core_barrier", 3)


def sendrecv(src, dst, send_to_rank, recv_from_rank, pipe_id, dma_engine=dma_engine.dma, name=None):
    _newer("sendrecv", 3)


def nonzero_with_count(dst, src, index_offset=0, padding_val=-1, name=None):
    _newer("nonzero_with_count", 3)




def topk(val_dst, idx_dst, src, n, name=None):
    # NKI 0.6 signature (nki.isa.topk page of SDK 2.32; 2.33 adds sorted=): "relevant for Trn2, Trn3"
    _newer("topk", 3)
