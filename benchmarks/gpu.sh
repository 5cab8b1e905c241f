#!/usr/bin/env bash
# Issue 14, goal 5: the speed benchmarks with trainer=gpu, in one prepared script (about 7 minutes on one GPU).
#
#   bash benchmarks/gpu.sh [DATA_DIR]        # from the repository root, on a machine with a CUDA GPU
#
# Prints: the VAE three-way table (hand loop vs latentlab-train) at 32-true and bf16-mixed, host syncs per
# training step counted with torch.profiler (VAE, and ALMOND's Langevin E-step), the estimator table
# (IS k=1000, AIS per annealing step) on the GPU. Compare with the CPU tables from the same commands without
# `--trainer gpu` (benchmarks/vae_mnist.py, benchmarks/estimators_speed.py). Each part has its own time limit,
# and a failing part does not stop the others.
set -u
cd "$(dirname "$0")/.."
DATA_DIR="${1:-}"
for d in "$DATA_DIR" ../shared/data shared/data; do
  if [ -n "$d" ] && [ -d "$d/mnist" ]; then DATA_DIR="$d"; break; fi
done
[ -d "$DATA_DIR/mnist" ] || { echo "gpu.sh: no MNIST under ../shared/data or shared/data; pass the data directory" >&2; exit 2; }
python -c "import latentlab" 2>/dev/null || pip install -q -e . || exit 2
python - <<'PY' || { echo "gpu.sh: needs torch with CUDA and a visible GPU" >&2; exit 2; }
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
export PYTHONUNBUFFERED=1
part() {  # part SECONDS TITLE COMMAND...
  local limit=$1 title=$2; shift 2
  echo; echo "=== $title ($(date -u +%H:%M:%S) UTC)"
  timeout "$limit" "$@" 2>&1 | grep -v -E '━|│|┃|┏|┡|└|Warning|warn' || echo "=== $title: failed or timed out"
}
V="python benchmarks/vae_mnist.py --data-dir $DATA_DIR --trainer gpu --threads 4"
part 150 "VAE, 32-true: hand loop (in process and as a script) vs latentlab-train (3 epochs each, taking turns)" $V --epochs 3
part 130 "VAE, bf16-mixed (loss and NLL must match 32-true within noise)" $V --epochs 3 --override trainer.precision=bf16-mixed
part 60 "host syncs per step: VAE training" $V --count-syncs 20
part 90 "host syncs per step: ALMOND (Langevin E-step inside each step)" $V --count-syncs 10 \
  --override model=almond model.vae_epochs=0
part 150 "estimators on the GPU: IS k=1000 on 1000 images, AIS per step" \
  python benchmarks/estimators_speed.py --data-dir "$DATA_DIR" --device cuda --is-n 1000 --ais-n 500 --ais-steps 50
echo; echo "=== done ($(date -u +%H:%M:%S) UTC)"
