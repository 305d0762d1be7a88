"""The official public surface of NKI 0.6 (Neuron SDK 2.32), written by hand from AWS's API reference.

Sources (read through the search tool; nothing here is copied code):
  * https://awsdocs-neuron.readthedocs-hosted.com/en/v2.32.0/nki/api/nki.language.html, .../nki.isa.html,
    .../nki.collectives.html and the generated per-name pages under .../nki/api/generated/ (signatures);
  * the "Source code for nki.language / nki.isa" pages of the same release (_modules/nki/language.html: ``DType =
    str``, ``class MemoryRegion(Enum)``, ``class NKIObject``), the 0.6 release notes (release-notes/components/
    nki.rst: ``topk``, ``fori_loop``, ``while_loop``, ``all_gather_v``, optional ``reduce_res`` of
    ``tensor_scalar_reduce``), and the enum values of nki/api/nki/isa/__init__.py in aws-neuron/aws-neuron-sdk.

Format: ``name -> entry``. A function entry is its parameter list exactly as documented, defaults written as the
docs write them (``sbuf``, ``uint8``, ``equal`` and ``maximum`` name the nl objects; ``reduce_cmd.idle`` an enum
member). Other entries: ``"dtype"``, ``"buffer"``, ``"op"`` (an operator object usable as ``op=``), ``"const"``,
``"module"``, ``("class", bases, {method: params})``, ``("enum", {member: value or None})`` (None: the docs give no
integer), ``("alias", target)``.

``MISSING`` lists every official name the interpreter does not provide, with the reason. The conformance test
(tests/test_sim_api.py) holds kernels.sim's ``nki``/``nl``/``nisa`` against this table in both directions.
"""

NKI = {
    "jit": "(fn=None, **kwargs)",
    "simulate": "(kernel)",
    "language": "module",
    "isa": "module",
    "collectives": "module",
    "typing": "module",
    "dtype": ("alias", "language.DType"),
}

_DTYPES = ["bool_", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float16", "float32", "bfloat16",
           "tfloat32", "float8_e4m3", "float8_e4m3fn", "float8_e5m2", "float8_e5m2_x4", "float8_e4m3fn_x4",
           "float8_e8m0fnu", "float4_e2m1fn_x4"]

_BINARY = ["add", "subtract", "multiply", "divide", "maximum", "minimum", "abs_max", "abs_min", "power", "equal",
           "not_equal", "less", "less_equal", "greater", "greater_equal", "bitwise_and", "bitwise_or", "bitwise_xor",
           "left_shift", "right_shift", "logical_and", "logical_or", "logical_xor", "fmod", "mod"]
_UNARY = ["abs", "square", "invert", "logical_not", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu",
          "gelu_apprx_sigmoid", "gelu_apprx_tanh", "gelu_dx", "gelu_apprx_sigmoid_dx", "silu", "silu_dx", "softplus",
          "mish", "erf", "erf_dx", "reciprocal", "copy", "sin", "cos", "tan", "arctan", "ceil", "floor", "trunc",
          "negative", "sign"]
_REDUCE = ["sum", "max", "min", "mean", "prod", "var"]

_TENSOR_METHODS = {
    "is_contiguous": "(self)",
    "get_pattern": "(self)",
    "is_indirect": "(self)",
    "permute": "(self, dims)",
    "broadcast": "(self, dim, size)",
    "expand_dim": "(self, dim)",
    "squeeze_dim": "(self, dim)",
    "reshape_dim": "(self, dim, shape)",
    "flatten_dims": "(self, start_dim, end_dim)",
    "reshape": "(self, shape)",
    "rearrange": "(self, src_pattern, dst_pattern, fixed_sizes=None)",
    "slice": "(self, dim, start, end, step=1)",
    "select": "(self, dim, index)",
    "vector_select": "(self, dim, vector_offset)",
    "ap": "(self, pattern, offset=None, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None)",
    "view": "(self, dtype)",
    "reinterpret_cast": "(self, dtype)",
    "indirect": "(self, index, num_elem=None)",
}
# Attributes of a tensor the docs describe (nl.NkiTensor class page: "shape", "dtype", "buffer", "name", "offset";
# "strides" and "ndim" are used by the docs' own examples).
TENSOR_ATTRIBUTES = ["shape", "dtype", "buffer", "name", "offset", "strides", "ndim"]

NL = {
    **{d: "dtype" for d in _DTYPES},
    "DType": "const",
    "sbuf": "buffer", "psum": "buffer", "hbm": "buffer", "private_hbm": "buffer", "shared_hbm": "buffer",
    "MemoryRegion": ("enum", {"sbuf": None, "psum": None, "private_hbm": None, "shared_hbm": None}),
    "NKIObject": ("class", (), {"__init__": "(self, **kwargs)"}),
    "NkiTensor": ("class", ("NKIObject",), _TENSOR_METHODS),
    "tile_size": "const",
    "average": "op", "prelu": "op", "bypass": "op",
    "is_hbm": "(buffer)", "is_on_chip": "(buffer)", "is_psum": "(buffer)", "is_sbuf": "(buffer)",
    **{b: "(x, y, dtype=None)" for b in _BINARY},
    **{u: "(x, dtype=None)" for u in _UNARY},
    **{r: "(x, axis, dtype=None, keepdims=False)" for r in _REDUCE},
    "all": "(x, axis, dtype=None)",
    "softmax": "(x, axis=-1, dtype=None)",
    "rms_norm": "(x, w, axis, n, epsilon=1e-06, dtype=None, compute_dtype=None)",
    "where": "(condition, x, y, dtype=None)",
    "dropout": "(x, rate, dtype=None)",
    "ndarray": "(shape, dtype, buffer=sbuf, name='', address=None)",
    "zeros": "(shape, dtype, buffer=sbuf, name='')",
    "ones": "(shape, dtype, buffer=sbuf, name='')",
    "full": "(shape, fill_value, dtype, buffer=sbuf, name='')",
    "rand": "(shape, dtype, buffer=sbuf, name='')",
    "zeros_like": "(x, dtype=None, buffer=None, name='')",
    "empty_like": "(x, dtype=None, buffer=None, name='')",
    "random_seed": "(seed)",
    "expand_dims": "(x, axis)",
    "broadcast_to": "(x, shape, dtype=None)",
    "transpose": "(x, dtype=None)",
    "matmul": "(x, y, transpose_x=False)",
    "no_reorder": "()",
    "load": "(src, dtype=None)",
    "store": "(dst, value)",
    "load_transpose2d": "(src, dtype=None)",
    "gather_flattened": "(data, indices, axis=0, dtype=None)",
    "ds": "(start, size)",
    "affine_range": "(start, stop=None, step=1)",
    "sequential_range": "(start, stop=None, step=1)",
    "static_range": "(start, stop=None, step=1)",
    "dynamic_range": "(start, stop=None, step=1)",
    "fori_loop": "(lower, upper, body_fun, step=1)",
    "while_loop": "(init, body_fun)",
    "program_id": "(axis=0)",
    "num_programs": "(axes=0)",
    "program_ndim": "()",
    "shared_constant": "(constant)",
    "shared_identity_matrix": "(n, dtype=uint8, dst=None)",
    "device_print": "(print_prefix, tensor)",
}

_E = {"engine": {"tensor": 1, "vector": 5, "scalar": 2, "gpsimd": 3, "dma": 4, "sync": 6, "unknown": 0},
      "dge_mode": {"unknown": 0, "swdge": 1, "hwdge": 2, "none": 3},
      "oob_mode": {"error": 0, "skip": 1},
      "reduce_cmd": {"idle": 0, "reset": 1, "reduce": 2, "reset_reduce": 3, "load_reduce": 4},
      "matmul_perf_mode": {"none": None, "double_row": None},
      "nc_version": {"gen2": 2, "gen3": 3, "gen4": 4},
      "dma_engine": {"dma": None, "gpsimd_dma": None}}

NISA = {
    **{k: ("enum", v) for k, v in _E.items()},
    "NkiValidationError": ("class", ("Exception",), {}),
    "VirtualRegister": ("class", ("NKIObject",), {"__init__": "(self, state=None, frozen=False)"}),
    "tensor_engine": ("alias", "engine.tensor"), "vector_engine": ("alias", "engine.vector"),
    "scalar_engine": ("alias", "engine.scalar"), "gpsimd_engine": ("alias", "engine.gpsimd"),
    "unknown_engine": ("alias", "engine.unknown"),
    "get_nc_version": "()",
    "get_nc_sub_version": "()",
    "dma_copy": "(dst, src, priority=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown, "
                "name=None)",
    "dma_transpose": "(dst, src, axes=None, priority=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error, "
                     "name=None)",
    "dma_compute": "(dst, srcs, reduce_op, scales=None, unique_indices=True, oob_mode=oob_mode.error, name=None)",
    "tensor_copy": "(dst, src, engine=engine.unknown, name=None)",
    "memset": "(dst, value, engine=engine.unknown, name=None)",
    "tensor_copy_predicated": "(dst, src, predicate, reverse_pred=False, name=None)",
    "nc_matmul": "(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False, is_transpose=False, "
                 "accumulate=None, tile_position=(), tile_size=(), perf_mode=matmul_perf_mode.none, name=None)",
    "nc_matmul_mx": "(dst, stationary, moving, stationary_scale, moving_scale, tile_position=None, tile_size=None, "
                    "accumulate=None, name=None)",
    "nc_transpose": "(dst, data, engine=engine.unknown, name=None)",
    "tensor_tensor": "(dst, data1, data2, op, engine=engine.unknown, name=None)",
    "tensor_scalar": "(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, "
                     "engine=engine.unknown, name=None)",
    "tensor_reduce": "(dst, op, data, axis, negate=False, keepdims=False, name=None)",
    "tensor_partition_reduce": "(dst, op, data, name=None)",
    "tensor_scalar_cumulative": "(dst, src, op0, op1, imm0, imm1=None, reduce_cmd=reduce_cmd.reset_reduce, "
                                "name=None)",
    "activation": "(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, "
                  "reduce_cmd=reduce_cmd.idle, name=None)",
    "activation_reduce": "(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None)",
    "activate2": "(dst, op, data, imm0, imm1, op0, op1, relu_param=0.0, reverse0=False, reverse1=False, "
                 "reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle, name=None)",
    "iota": "(dst, pattern, offset=0, channel_multiplier=0, name=None)",
    "affine_select": "(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=equal, offset=0, "
                     "name=None)",
    "local_gather": "(dst, src_buffer, index, num_elem_per_idx=1, num_valid_indices=None, name=None)",
    "nc_n_gather": "(dst, data, indices, name=None)",
    "sequence_bounds": "(dst, segment_ids, name=None)",
    "topk": "(val_dst, idx_dst, src, n, name=None)",
    "bn_stats": "(dst, data, name=None)",
    "bn_aggr": "(dst, data, name=None)",
    "tensor_tensor_scan": "(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None)",
    "nc_stream_shuffle": "(dst, src, shuffle_mask, name=None)",
    "rng": "(dst, engine=engine.unknown, name=None)",
    "dropout": "(dst, data, prob, name=None)",
    "set_rng_seed": "(src_seeds, name=None)",
    "rand_set_state": "(src_seeds, engine=engine.unknown, name=None)",
    "rand_get_state": "(dst, engine=engine.unknown, name=None)",
    "rand2": "(dst, min, max, name=None)",
    "exponential": "(dst, src, max_value=0.0, reduce_res=None, reduce_cmd=reduce_cmd.idle, reduce_init=0.0, "
                   "name=None)",
    "reciprocal": "(dst, data, name=None)",
    "max8": "(dst, src, name=None)",
    "scalar_tensor_tensor": "(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None)",
    "tensor_scalar_reduce": "(dst, data, op0, operand0, reduce_op, reduce_res=None, reverse0=False, "
                            "reduce_cmd=reduce_cmd.reset_reduce, reduce_init=None, name=None)",
    "core_barrier": "(data, cores, engine=engine.gpsimd, name=None)",
    "quantize_mx": "(dst, src, dst_scale, name=None)",
    "range_select": "(dst, on_true_tile, comp_op0, comp_op1, bound0, bound1, reduce_cmd=reduce_cmd.reset_reduce, "
                    "reduce_res=None, reduce_op=maximum, range_start=0, on_false_value=-3.4028234663852886e+38, "
                    "name=None)",
    "select_reduce": "(dst, predicate, on_true, on_false, reduce_res=None, reduce_cmd=reduce_cmd.idle, "
                     "reduce_op=maximum, reverse_pred=False, name=None)",
    "sendrecv": "(src, dst, send_to_rank, recv_from_rank, pipe_id, dma_engine=dma_engine.dma, name=None)",
    "register_alloc": "(x=None)",
    "register_move": "(dst, src)",
    "register_load": "(dst, src)",
    "register_store": "(dst, src)",
    "nc_find_index8": "(dst, data, vals, name=None)",
    "nc_match_replace8": "(dst, data, vals, imm, dst_idx=None, name=None)",
    "nonzero_with_count": "(dst, src, index_offset=0, padding_val=-1, name=None)",
}

COLLECTIVES = {
    "ReplicaGroup": ("class", ("NKIObject",), {}),
    "all_reduce": "(srcs, dsts, replica_group, op, priority=None, name=None)",
    "all_gather": "(srcs, dsts, replica_group, collective_dim, priority=None, name=None)",
    "reduce_scatter": "(srcs, dsts, replica_group, collective_dim, op, priority=None, name=None)",
    "all_to_all": "(srcs, dsts, replica_group, collective_dim, priority=None, name=None)",
    "all_to_all_v": "(srcs, dsts, replica_group, metadata_tensor, recv_counts_known=False, has_rdispls=False, "
                    "priority=None, name=None)",
    "all_gather_v": "(srcs, dsts, replica_group, metadata_tensor, recv_counts_known=False, has_rdispls=False, "
                    "priority=None, name=None)",
    "collective_permute": "(srcs, dsts, source_target_pairs, priority=None, name=None)",
    "collective_permute_implicit": "(srcs_by_channel, dsts_by_channel, replica_group, channel_ids=[0], priority=None, "
                                   "name=None)",
    "collective_permute_implicit_reduce": "(srcs0_by_channel, srcs1_by_channel, dsts_by_channel, replica_group, op, "
                                          "channel_ids=[0], priority=None, name=None)",
    "collective_permute_implicit_current_processing_rank_id": "(iteration_id, replica_group, channel_id=0, "
                                                              "name=None)",
    "rank_id": "(name=None)",
}

TYPING = {"tensor": "const"}

# nl.tile_size attributes (generated/nki.language.tile_size.html)
TILE_SIZE = ["pmax", "psum_fmax", "psum_fmax_bytes", "psum_num_banks", "sbuf_size_bytes", "sbuf_fmax",
             "sbuf_fmax_bytes", "gemm_stationary_fmax", "gemm_moving_fmax", "bn_stats_fmax", "psum_min_align",
             "sbuf_min_align", "total_available_sbuf_size"]

# Official names the interpreter does not provide, with the reason (module, name) -> reason.
MISSING = {
    ("nisa", "NkiInstruction"): "named in the issue as a 0.6 name, but no stored reference page or public kernel "
                                "describes or uses it; not guessed",
    ("nisa", "constants"): "named in the issue as a 0.6 name, but no stored reference page lists its members and no "
                           "public kernel uses one; not guessed",
}
