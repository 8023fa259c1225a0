#!/bin/sh
# builds libmoe_mv.so against the XLA FFI headers shipped inside jaxlib
set -e
cd "$(dirname "$0")"
INC=$(python -c "import jax.ffi, os; print(jax.ffi.include_dir())")
g++ -O3 -march=native -fopenmp-simd -std=c++17 -shared -fPIC -I"$INC" moe_mv.cc -o libmoe_mv.so -lpthread
echo built $(pwd)/libmoe_mv.so
