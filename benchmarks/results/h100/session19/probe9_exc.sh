#!/usr/bin/env bash
# GPU probe 9 (nineteenth session): why does a C++ exception thrown inside palm_fast._C
# crash the process (SIGSEGV) on the GPU image (torch 2.11+cu130, Python 3.12, GCC 13)?
# A throw-and-catch in a tiny .so (no torch) built plainly / with -fopenmp / with
# -static-libgcc, called through ctypes with and without torch imported; then the extension
# under cuda-gdb (backtrace) and the dynamic linker's bindings of the unwinder symbols.
# Run from the repository root: bash benchmarks/results/h100/session19/probe9_exc.sh
T=$(mktemp -d)
cat > $T/t.cpp <<'CPP'
#include <stdexcept>
extern "C" int f() { try { throw std::runtime_error("x"); } catch (const std::exception&) { return 1; } return 0; }
CPP
g++ --version | head -1
g++ -O2 -shared -fPIC $T/t.cpp -o $T/plain.so
g++ -O2 -shared -fPIC -fopenmp $T/t.cpp -o $T/omp.so
g++ -O2 -shared -fPIC -static-libgcc $T/t.cpp -o $T/slg.so
g++ -O2 -shared -fPIC -static-libgcc -static-libstdc++ $T/t.cpp -o $T/sls.so
for so in plain omp slg sls; do
  for pre in "" "import torch; " "import torch, palm_fast._C; "; do
    python3 -c "${pre}import ctypes; print(ctypes.CDLL('$T/$so.so').f())" > $T/o 2>&1
    echo "$so [${pre:-bare}]: rc=$? $(tail -c 200 $T/o)"
  done
done
BAD="import torch; from palm_fast._ext import cpp; q=torch.randn(1,7,2,8); k=torch.randn(1,7,8)
try:
    cpp().mqa_attn_fwd(q, k[:, :5], k, 0.5)
except RuntimeError as e: print('raised', str(e)[:80])"
python3 -c "$BAD"; echo "extension bad call: rc=$?"
SO=$(ls palm_fast/_C*.so)
echo "== ldd $SO"; ldd $SO
echo "== exporters of _Unwind_RaiseException / __cxa_throw among loaded torch and nvidia libs"
SP=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
for f in $SP/torch/lib/*.so* $SP/nvidia/*/lib/*.so* $SP/triton/_C/*.so; do
  nm -D --defined-only "$f" 2>/dev/null | grep -qE " (_Unwind_RaiseException|__cxa_throw|_Unwind_Resume)$" && echo "$f: $(nm -D --defined-only $f | grep -E ' (_Unwind_RaiseException|__cxa_throw|_Unwind_Resume|__gxx_personality_v0)$' | awk '{print $3}' | tr '\n' ' ')"
done
echo "== bindings"
LD_DEBUG=bindings python3 -c "$BAD" 2>&1 | grep -E "_Unwind_RaiseException|__cxa_throw|_Unwind_Resume|__gxx_personality_v0|_Unwind_Find_FDE|__cxa_begin_catch" | sed 's/^ *[0-9]*: *//' | sort | uniq | head -40
echo "== cuda-gdb backtrace"
timeout 120 cuda-gdb -q -batch -ex run -ex "bt 25" -ex "info registers rip rsp" -ex "x/6i \$pc-12" --args python3 -c "$BAD" 2>&1 | grep -vE "^\[New Thread|^\[Thread|^warning:|Download|debuginfod" | tail -60
