#!/usr/bin/env bash
# The nineteenth session's GPU calls (one H100): bash benchmarks/results/h100/session19/run.sh STAGE
# Everything lands in $OUT/r, packed as $OUT/r.tgz after each step (a call cut at its time
# limit still returns what ran). Stage 1 builds and keeps the extension for the later calls,
# which carry it (palm_fast/_C*.so) and run from the source tree.
# (Run as written here; the probe scripts were in benchmarks/results/h100/probes/ then and moved
# here afterwards. Stage 2 carried the extension stage 1 built; stage 3 rebuilt it after the
# setup.py change, and stage 4 carried that build.)
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
case "$1" in
1)
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$R/device.txt" 2>&1
  cat "$R/device.txt"
  step build 200 env MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e .
  cp palm_fast/_C*.so "$OUT/"
  TAILN=40 step pytest 390 python3 -m pytest -q -n 14 --timeout 300 -p no:cacheprovider -rfE tests/
  step decode 150 python3 -m palm_fast.cli bench --only decode --json "$R/decode.json"
  ;;
2)
  export PYTHONPATH=$PWD
  P=benchmarks/results/h100/session19
  TAILN=80 step probe9_decode 260 python3 $P/probe9_decode.py 230
  TAILN=70 step probe9_ln 120 python3 $P/probe9_ln.py
  step layer_norm 120 python3 -m palm_fast.cli bench --only layer_norm --json "$R/layer_norm.json"
  step probe9_mem 80 python3 $P/probe9_mem.py
  ;;
3)
  step build 200 env MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e .
  cp palm_fast/_C*.so "$OUT/"
  echo "private C++ runtime symbols in _C: $(nm -D --defined-only palm_fast/_C*.so | grep -cE ' (__cxa_throw|__gxx_personality_v0)$')"
  TAILN=60 step probe9_exc 60 bash benchmarks/results/h100/session19/probe9_exc.sh
  TAILN=30 step pytest_targeted 170 python3 -m pytest -q -n 14 --timeout 160 -p no:cacheprovider -rfE \
    tests/test_device_guard.py tests/test_packaging.py tests/test_lowering.py tests/test_mqa_decode.py \
    tests/test_mqa_attention.py tests/test_swiglu.py tests/test_layer_norm.py \
    tests/test_fusion.py::test_zero_constants_in_products_quotients_and_scalar_math \
    tests/test_block.py::test_packed_weight_cache_sees_a_new_tensor_at_the_old_address
  step decode 100 python3 -m palm_fast.cli bench --only decode --json "$R/decode.json"
  TAILN=12 step shared_prefix_tiles 110 python3 benchmarks/results/h100/probes/shared_prefix_tiles.py
  step layer_norm 100 python3 -m palm_fast.cli bench --only layer_norm --json "$R/layer_norm.json"
  ;;
4)
  export PYTHONPATH=$PWD
  step model 110 python3 -m palm_fast.cli bench --only model --json "$R/model.json"
  step generate_patch 70 python3 -m palm_fast.cli bench --only generate,patch --quick --json "$R/generate_patch.json"
  step rope_swiglu 90 python3 -m palm_fast.cli bench --only rope,swiglu --json "$R/rope_swiglu.json"
  step block 90 python3 -m palm_fast.cli bench --only block --json "$R/block.json"
  ;;
esac
