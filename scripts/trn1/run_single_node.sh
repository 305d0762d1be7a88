#!/usr/bin/env bash
# One trn1.32xlarge: 32 NeuronCores = TP 8 x DP 4. Untested here (no Trainium in our CI).
#   scripts/trn1/run_single_node.sh                      # Llama 2 7B, TP 8, bf16-sr, NKI kernels
#   COMPILE=1 scripts/trn1/run_single_node.sh            # ahead-of-time compile only (few steps, fills the cache)
#   scripts/trn1/run_single_node.sh --config llama2-13b --max-steps 1000   # extra flags go to train.py
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/trn1/env.sh
OUT_DIR=${OUT_DIR:-runs/llama2-7b-trn1}
ARGS=(--config llama2-7b --kernels nki --device xla --out-dir "$OUT_DIR" "$@")
LAUNCH=(torchrun --nproc_per_node 32 train.py)
if [[ "${COMPILE:-0}" == 1 ]]; then
    # Traces a few steps and compiles every graph in parallel into $NEURON_COMPILE_CACHE_URL; no real training.
    # Must use the same world size (and so DP degree) as the real run, or the graphs differ.
    exec neuron_parallel_compile "${LAUNCH[@]}" "${ARGS[@]}" --max-steps "${COMPILE_STEPS:-4}" \
        --checkpoint-every 0 --out-dir "$OUT_DIR-compile"
fi
# Continue the run in OUT_DIR when it already has a checkpoint (train.py refuses to overwrite a run otherwise).
if compgen -G "$OUT_DIR/checkpoints/step_*" > /dev/null; then ARGS+=(--resume); fi
exec "${LAUNCH[@]}" "${ARGS[@]}"
