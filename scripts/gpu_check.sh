#!/usr/bin/env bash
# One prepared GPU check (issue 15), about 6-8 minutes on one H200:
#   1. the tests with a CUDA path (tests/test_device.py: ops fwd+bwd, stochastic rounding, widened bf16 matmuls,
#      train.py steps on the device);
#   2. a loss-curve parity run, --precision mixed vs bf16-sr, on a config large enough to matter (8 layers, hidden
#      1024, 16 heads, sequence 1024, 300 steps on the embedded corpus);
#   3. tokens/s and MFU of both runs against the GPU's datasheet dense bf16 peak (training/metrics.py table; H200
#      SXM: 989 TFLOPS bf16 dense, NVIDIA H200 datasheet "1,979 TFLOPS" being with sparsity), and the comparison
#      plot parity.png.
# Usage: scripts/gpu_check.sh [OUT_DIR] [--dry-run]      (OUT_DIR defaults to $OUT, else ./gpu_check_out)
#   --dry-run: the same steps on the CPU at toy sizes (2 layers, hidden 64, sequence 64, 6 steps), to check the
#   script itself where no GPU is at hand.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
DEST=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -*) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
    *) DEST="$a" ;;
  esac
done
DEST="${DEST:-${OUT:-gpu_check_out}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; LAYERS=2; HIDDEN=64; HEADS=4; FFN=176; SEQ=64; STEPS=6; MICRO=4; GLOBAL=8
  export LLAMA_TEST_DEVICE=cpu
else
  python - <<'EOF' || { echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run on a CPU)" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
  DEVICE=cuda; LAYERS=8; HIDDEN=1024; HEADS=16; FFN=2816; SEQ=1024; STEPS=300; MICRO=8; GLOBAL=16
fi

echo "== gpu_check: device $DEVICE, out $DEST"
python - <<'EOF' | tee "$DEST/device.txt"
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    import platform
    print(f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}")
EOF

echo "== 1. tests with a CUDA path"
python -m pytest -q tests/test_device.py 2>&1 | tee "$DEST/tests.txt"

echo "== 2. parity: mixed vs bf16-sr"
cat > "$DEST/parity.toml" <<EOF
preset = "tiny"
seq_len = $SEQ
micro_batch_size = $MICRO
global_batch_size = $GLOBAL
max_steps = $STEPS
warmup_steps = $(( STEPS / 10 ))
lr = 1e-3
checkpoint_every = 0
[model_overrides]
hidden_size = $HIDDEN
intermediate_size = $FFN
num_layers = $LAYERS
num_heads = $HEADS
num_kv_heads = $HEADS
max_seq_len = $SEQ
EOF
for precision in mixed bf16-sr; do
  rm -rf "$DEST/$precision"
  python train.py --config "$DEST/parity.toml" --precision "$precision" --device "$DEVICE" --out-dir "$DEST/$precision" \
    --no-progress 2>&1 | tee "$DEST/$precision.log"
done

echo "== 3. throughput, MFU and parity"
python - "$DEST" "$STEPS" <<'EOF' | tee "$DEST/summary.txt"
import json, os, statistics, sys
from training.metrics import read_metrics
from training.plot import plot_runs
dest, steps = sys.argv[1], int(sys.argv[2])
runs = {p: [r for r in read_metrics(os.path.join(dest, p)) if r.get("loss") is not None] for p in ("mixed", "bf16-sr")}
for p, recs in runs.items():
    steady = recs[len(recs) // 10 + 1:] or recs
    log = open(os.path.join(dest, f"{p}.log")).read()
    peak = next((ln.strip() for ln in log.splitlines() if ln.strip().startswith("MFU")), "MFU n/a")
    print(f"{p:8s} tokens/s median {statistics.median(r['tokens_per_s'] for r in steady):,.0f}  "
          f"MFU median {100 * statistics.median(r['mfu'] for r in steady):.2f}%  | summary: {peak}")
n = min(len(v) for v in runs.values())
window = max(1, n // 10)
tail = {p: sum(r["loss"] for r in v[n - window:n]) / window for p, v in runs.items()}
gap = tail["bf16-sr"] - tail["mixed"]
print(f"mean loss of the last {window} steps: mixed {tail['mixed']:.4f}, bf16-sr {tail['bf16-sr']:.4f}, "
      f"bf16-sr - mixed = {gap:+.4f} ({100 * gap / tail['mixed']:+.2f}%)")
print("plot:", plot_runs([os.path.join(dest, p) for p in runs], os.path.join(dest, "parity.png"), labels=list(runs),
                         title="mixed vs bf16-sr loss"))
EOF
echo "== done: $DEST"
