#!/usr/bin/env bash
# Everything the GPU issue asks for, in one command on an H100/H200 (Python 3.12, jax with CUDA, wheels for
# optuna/sqlalchemy brought along by ../shared/tools/gpu-wheels.sh). Results go to $OUT (or ./gpu-results).
#
#   bash benchmarks/gpu/run.sh [tests|model|forward|backward|grid|all]
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export AUTOTUNE_DB="$out/results.db" PYTHONUNBUFFERED=1
part=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"

if [[ $part == all || $part == tests ]]; then
  # compiled kernels against the reference (the gpu-marked tests run the Triton lowering, not interpret mode)
  python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu-tests.log"
fi
if [[ $part == all || $part == model ]]; then
  # the static time model's predictions (made on the CPU machine) against this GPU, 40 forward configs, < 8 min
  OUT="$out" python3 benchmarks/gpu/predicted_vs_measured.py 2>&1 | tee "$out/predicted-vs-measured.log"
fi
if [[ $part == all || $part == forward ]]; then
  python3 -m autotune search --shapes benchmarks/gpu/sweep.toml --trials 40 --patience 15 --quiet 2>&1 | tee "$out/search-forward.log"
  python3 -m autotune bench --shapes benchmarks/gpu/sweep.toml --json > "$out/bench-forward.json"
fi
if [[ $part == all || $part == backward ]]; then
  python3 -m autotune search --shapes benchmarks/gpu/sweep.toml --backward --trials 30 --patience 12 --quiet 2>&1 | tee "$out/search-backward.log"
  python3 -m autotune bench --shapes benchmarks/gpu/sweep.toml --backward --json > "$out/bench-backward.json"
fi
if [[ $part == all || $part == grid ]]; then
  python3 benchmarks/search_efficiency.py --out "$out/search-efficiency" 2>&1 | tail -8
fi
python3 -m autotune export "$out/tuned.json"
python3 -m autotune list > "$out/list.txt"
