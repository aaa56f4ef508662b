#!/usr/bin/env bash
# What we run on a lent GPU machine (no network; torch/triton preinstalled):
# build, run the test suite on CUDA, run the benchmark suite; logs and JSON go to $OUT.
#   bash benchmarks/run_gpu.sh [extra palm-fast bench args]
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  python3 -m pytest -q tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
fi
# The PNG where matplotlib is installed; otherwise draw it later from the JSON:
#   palm-fast plot bench.json --out bench.png
PLOT=()
python3 -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/bench.png")
python3 -m palm_fast.cli bench --json "$OUT/bench.json" "${PLOT[@]}" "$@" 2>&1 | tee "$OUT/bench.log"
