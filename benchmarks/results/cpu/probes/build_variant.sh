#!/bin/bash
# usage: build_variant.sh NAME "-DFOO=1 ..." [SOURCE]  -> /tmp/so_NAME/_C...so (for decode_ab.py)
# SOURCE: a variant of csrc/mqa_decode.cpp (default: csrc/mqa_decode.cpp itself).
# Recompiles csrc/mqa_decode.cpp with extra flags and links it with the other objects of the
# last `python setup.py build_ext --inplace`. Paths are this VM's (checkout /work/main,
# pyenv Python 3.11.7); edit them elsewhere.
set -e
NAME=$1; FLAGS=$2; SRC=${3:-/work/main/csrc/mqa_decode.cpp}; T=/work/main/build/temp.linux-x86_64-cpython-311/csrc
TI=/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/torch
mkdir -p /tmp/so_$NAME
c++ -DNDEBUG -fwrapv -O3 -fPIC -I/work/main/csrc -I$TI/include -I$TI/include/torch/csrc/api/include -I/root/.pyenv/versions/3.11.7/include/python3.11 -c $SRC -o /tmp/so_$NAME/mqa_decode.o -fopenmp -std=c++17 -march=native -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C $FLAGS 2>/dev/null
objs=""; for f in $T/*.o; do [ "$(basename $f)" = mqa_decode.o ] || objs="$objs $f"; done
g++ -shared $objs /tmp/so_$NAME/mqa_decode.o -L$TI/lib -lc10 -ltorch -ltorch_cpu -ltorch_python -o /tmp/so_$NAME/_C.cpython-311-x86_64-linux-gnu.so -fopenmp
echo built /tmp/so_$NAME
