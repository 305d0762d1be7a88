"""Where each rule the interpreter enforces comes from. Every ConstraintError names its rule
(``rule <name>: ...``); ``source(name)`` gives the page or document that states it (tests/test_sim_official.py
checks that every rule raised in kernels/sim has one). Pages are under
https://awsdocs-neuron.readthedocs-hosted.com/en/v2.32.0/nki/api/ ("generated/nki.isa.X" = the nki.isa.X page);
"spec N" = a section of /work/shared/docs/nki-spec.md, itself written from those pages and the trn1 architecture
guide."""

_ISA = "generated/nki.isa.{}.html"

# rule family (the part before the first dot) or full rule name -> source
SOURCES = {
    # operands and layout (spec 2.1: partition dim first, <= 128 partitions, access patterns, start partitions)
    "partition": "spec 2.1 / trn1 architecture guide (partition count, start and stride)",
    "rank": "spec 2.1 (on-chip tiles: partition dim + up to 4 free dims)",
    "access_pattern": "spec 2.1 (hardware access pattern: uint16 counts, int16 strides)",
    "free": "every elementwise nki.isa page: 'same number of elements per partition'",
    "operand": "nki.api.shared (NKI ISA API common fields: scalar or [P,1] operands, fp32 operands)",
    "buffer": "the Memory types section of each nki.isa page",
    "engine": "nki.api.shared (NKI engine selection) and the engine= parameter of each page",
    "engine.psum": "spec 2.6: 'GpSimd Engine cannot access PSUM'",
    "ap": "generated/nki.language.NkiTensor.html (ap: partition stride of on-chip views)",
    "indirect": "generated/nki.language.NkiTensor.html (ap/select/vector_select: indirect views) and "
                + _ISA.format("dma_copy") + " (indirect addressing)",
    "address": "generated/nki.language.ndarray.html (address=(partition_offset, free_offset)); spec 3.1 capacity",
    "capacity": "spec 3.1 (trn1: 192 KiB SBUF per partition minus 16 KiB reserved; PSUM 8 x 2 KiB banks)",
    "platform": "the 'Available only on NeuronCore-vN' notes of each page",
    "lnc": "generated/nki.jit.html (LNC degree by kernel[lnc]; trn1 has LNC=1)",
    "output": "generated/nki.jit.html (kernels return HBM tensors) and the NKI simulator guide (inputs updated in "
              "place)",
    "language": "NKI language guide (nki/programming_model: the Python subset, tracing)",
    "loop": "generated/nki.language.fori_loop.html, while_loop.html, dynamic_range.html",
    "register": _ISA.format("register_alloc") + ", register_move/load/store",
    "collectives": "nki.collectives pages (replica groups); the interpreter is one rank",
    "broadcast": "generated/nki.language.broadcast_to.html and the nl elementwise pages (broadcastable shapes)",
    "gather": "generated/nki.language.gather_flattened.html",
    # operators (kernels.sim.ops.OP_RULES gives the per-instruction tables)
    "op": "nki.api.shared: Supported Math Operators (nki-aluop) and Activation Functions (nki-act-func) tables",
    "reduce": _ISA.format("tensor_reduce") + " (reduction axes and legal reduction operators)",
    "reduce_cmd": "generated/nki.isa.reduce_cmd.html and the reduce_cmd parameter of each page",
    "reduce_init": _ISA.format("tensor_scalar_reduce") + " (reduce_init with load_reduce)",
    "reduce_res": "the reduce_res parameter ([P,1]) of activation / tensor_scalar_reduce / select_reduce",
    "pattern": _ISA.format("iota") + " (up to 4-D pattern covering the dst elements)",
    # per instruction
    "dma": _ISA.format("dma_copy"),
    "dma_transpose": _ISA.format("dma_transpose"),
    "dma_compute": _ISA.format("dma_compute"),
    "matmul": _ISA.format("nc_matmul"),
    "transpose": _ISA.format("nc_transpose"),
    "activation": _ISA.format("activation"),
    "tensor_tensor": _ISA.format("tensor_tensor"),
    "tensor_scalar": _ISA.format("tensor_scalar"),
    "scalar_tensor_tensor": _ISA.format("scalar_tensor_tensor"),
    "tensor_tensor_scan": _ISA.format("tensor_tensor_scan"),
    "select_reduce": _ISA.format("select_reduce"),
    "affine_select": _ISA.format("affine_select"),
    "memset": _ISA.format("memset"),
    "bn_stats": _ISA.format("bn_stats"),
    "bn_aggr": _ISA.format("bn_aggr"),
    "max8": _ISA.format("max8"),
    "shuffle": _ISA.format("nc_stream_shuffle"),
    "rng": _ISA.format("rng") + ", set_rng_seed",
    "dropout": _ISA.format("dropout"),
    "copy_predicated": _ISA.format("tensor_copy_predicated"),
    "cumulative": _ISA.format("tensor_scalar_cumulative"),
    "local_gather": _ISA.format("local_gather"),
    "nc_n_gather": _ISA.format("nc_n_gather"),
    "find_index8": _ISA.format("nc_find_index8"),
    "nc_find_index8": _ISA.format("nc_find_index8"),
    "match_replace8": _ISA.format("nc_match_replace8"),
    "nc_match_replace8": _ISA.format("nc_match_replace8"),
    "sequence_bounds": _ISA.format("sequence_bounds"),
}


def source(rule):
    """The source of ``rule`` (exact name first, then its family), or None."""
    if rule in SOURCES:
        return SOURCES[rule]
    return SOURCES.get(rule.split(".", 1)[0])
