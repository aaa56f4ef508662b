#!/usr/bin/env bash
# The twenty-third session's GPU calls (one H100): bash benchmarks/results/h100/session23/run.sh STAGE
# Everything lands in $OUT/r, packed as $OUT/r.tgz after each step (a call cut at its time
# limit still returns what ran). Stage 1 builds the extension and returns it (palm_fast/_C*.so);
# later stages carry it and run from the source tree with PYTHONPATH=$PWD.
# Calls made: 1 = stage 1 (clean 2d9ad15); 2 = stage 2 without the links below (every step an
# import error); 3 = stage 2 with the kernels link only (probe 12 and the bench failed to import
# palm_fast.benchmarks; pytest_a.log ran: the 3 mean-correction failures, see NOTES.md);
# 4 = stage 3 (the suffix-pass span change: decode.*, pytest_b.log); 5 = stage 4 (with an IEEE
# division in the LayerNorm forward graph, reverted after this run: layer_norm_div_rejected.log;
# probe12.log, pytest_c.log); 6 = stage 5 (3cf9cba's code: layer_norm.*, pytest_d.log);
# 7 = stage 6 (probe13.log); 8 = stage 7 (probe14.log, with the tiled_warps option
# of 7a7fa9c, before the launcher took the setting as its default).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/r.tgz" -C "$OUT" r; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $R/NAME.log
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout -s INT "$limit" "$@" > "$R/$name.log" 2>&1
  echo "== $name rc $? in $(( $(date +%s) - t )) s"; tail -${TAILN:-6} "$R/$name.log"; pack
}
P=benchmarks/results/h100/probes
case "$1" in
1)
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$R/device.txt" 2>&1
  cat "$R/device.txt"
  step build 200 env MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e .
  cp palm_fast/_C*.so "$OUT/"
  TAILN=40 step probe11 150 python3 $P/probe11.py
  step layer_norm 100 python3 -m palm_fast.cli bench --only layer_norm --json "$R/layer_norm.json"
  step decode 110 python3 -m palm_fast.cli bench --only decode --json "$R/decode.json"
  TAILN=80 step probe10 120 python3 $P/probe10.py
  ;;
2)
  export PYTHONPATH=$PWD
  # (no install on a fresh machine: the package's kernels/ folder, which an install maps
  # to palm_fast.kernels, linked in place; the extension carried from stage 1)
  [ -e palm_fast/kernels ] || ln -s ../kernels palm_fast/kernels
  [ -e palm_fast/benchmarks ] || ln -s ../benchmarks palm_fast/benchmarks
  TAILN=20 step probe12 60 python3 benchmarks/results/h100/session23/probe12.py
  TAILN=3 step decode 70 python3 -m palm_fast.cli bench --only decode --json "$R/decode.json"
  TAILN=30 step pytest_a 420 python3 -m pytest -q -n 14 --timeout 300 -p no:cacheprovider -rfE \
    tests/test_mqa_decode.py tests/test_kv_cache.py tests/test_generate.py tests/test_tracing.py \
    tests/test_fusion.py tests/test_layer_norm.py tests/test_argument_checks.py tests/test_dispatch.py \
    tests/test_device_guard.py tests/test_lowering.py tests/test_mqa_attention.py
  ;;
3)
  export PYTHONPATH=$PWD
  [ -e palm_fast/kernels ] || ln -s ../kernels palm_fast/kernels
  [ -e palm_fast/benchmarks ] || ln -s ../benchmarks palm_fast/benchmarks
  TAILN=20 step probe12 60 python3 benchmarks/results/h100/session23/probe12.py
  TAILN=3 step decode 70 python3 -m palm_fast.cli bench --only decode --json "$R/decode.json"
  TAILN=30 step pytest_b 420 python3 -m pytest -q -n 14 --timeout 300 -p no:cacheprovider -rfE \
    tests/test_patch.py tests/test_block.py tests/test_model.py tests/test_rope.py tests/test_swiglu.py \
    tests/test_reference.py tests/test_lm_loss.py tests/test_bench.py tests/test_suite.py \
    tests/test_config.py tests/test_packaging.py tests/test_flops.py tests/test_readme.py
  ;;
4)
  export PYTHONPATH=$PWD
  [ -e palm_fast/kernels ] || ln -s ../kernels palm_fast/kernels
  [ -e palm_fast/benchmarks ] || ln -s ../benchmarks palm_fast/benchmarks
  TAILN=20 step pytest_c 150 python3 -m pytest -q -n 14 --timeout 140 -p no:cacheprovider -rfE \
    tests/test_fusion.py tests/test_layer_norm.py tests/test_mqa_decode.py tests/test_lowering.py
  TAILN=20 step probe12 60 python3 benchmarks/results/h100/session23/probe12.py
  TAILN=3 step layer_norm 90 python3 -m palm_fast.cli bench --only layer_norm --json "$R/layer_norm.json"
  ;;
5)
  export PYTHONPATH=$PWD
  [ -e palm_fast/kernels ] || ln -s ../kernels palm_fast/kernels
  [ -e palm_fast/benchmarks ] || ln -s ../benchmarks palm_fast/benchmarks
  TAILN=8 step pytest_d 100 python3 -m pytest -q -n 14 --timeout 90 -p no:cacheprovider -rfE \
    tests/test_fusion.py tests/test_layer_norm.py tests/test_lowering.py
  TAILN=3 step layer_norm 90 python3 -m palm_fast.cli bench --only layer_norm --json "$R/layer_norm.json"
  ;;
6)
  export PYTHONPATH=$PWD
  [ -e palm_fast/kernels ] || ln -s ../kernels palm_fast/kernels
  [ -e palm_fast/benchmarks ] || ln -s ../benchmarks palm_fast/benchmarks
  TAILN=40 step probe13 170 python3 benchmarks/results/h100/session23/probe13.py
  ;;
7)
  export PYTHONPATH=$PWD
  [ -e palm_fast/kernels ] || ln -s ../kernels palm_fast/kernels
  [ -e palm_fast/benchmarks ] || ln -s ../benchmarks palm_fast/benchmarks
  TAILN=40 step probe14 170 python3 benchmarks/results/h100/session23/probe14.py
  ;;
esac
