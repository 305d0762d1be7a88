# Neuron environment for train.py on trn1 (source it: `. scripts/trn1/env.sh`). Untested here: no Trainium in our CI.
# Values follow the Neuron docs (runtime / compiler environment-variable pages) and NeMo / NxD Llama 2 recipes.

# bf16-sr: the runtime rounds every fp32->bf16 cast stochastically (train.py also sets both for --precision bf16-sr,
# before torch_xla starts the runtime); the seed makes runs reproducible.
export NEURON_RT_STOCHASTIC_ROUNDING_EN=${NEURON_RT_STOCHASTIC_ROUNDING_EN:-1}
export NEURON_RT_STOCHASTIC_ROUNDING_SEED=${NEURON_RT_STOCHASTIC_ROUNDING_SEED:-0}
# Compiler: transformer-tuned scheduling and the LLM-training distribution strategy (the flags NeMo and NxD use).
export NEURON_CC_FLAGS=${NEURON_CC_FLAGS:-"--model-type transformer --distribution-strategy=llm-training"}
# Persistent compile cache on a filesystem every node sees, so the AOT compile step's graphs are reused at train time.
export NEURON_COMPILE_CACHE_URL=${NEURON_COMPILE_CACHE_URL:-$HOME/neuron_cache}
# Fewer glibc malloc arenas: 32 processes per node otherwise fragment host memory (host OOM at checkpoint save).
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-128}
# Let the runtime queue several executions so the host does not stall the NeuronCores between graphs.
export NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS=${NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS:-5}
# The kernels.ops backend: the NKI kernels (also the default on XLA devices).
export LLAMA_KERNELS_BACKEND=${LLAMA_KERNELS_BACKEND:-nki}
# Fewer host threads per process (32 processes share the host's vCPUs).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
