# Sourced by the GPU window scripts (gpu_quality.sh, gpu_serving.sh): puts the lent machine's CUDA libtorch
# on the library path (Python torch's, unless LIBTORCH_LIB names one) and logs at info by default.
if [ -z "${LIBTORCH_LIB:-}" ] && torch_dir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null); then
    LIBTORCH_LIB=$torch_dir/lib
fi
[ -n "${LIBTORCH_LIB:-}" ] && export LD_LIBRARY_PATH="$LIBTORCH_LIB:${LD_LIBRARY_PATH:-}"
export RUST_LOG=${RUST_LOG:-info}
