#!/usr/bin/env bash
# Every GPU check of this project in one device call (about 5 minutes on one H100/H200):
# the GPU tests, the overlap benchmark and the performance model's GPU parts. Logs and JSON go
# to $OUT. The GPU image has torch, triton and most of diffusers' needs, but not diffusers.
#
# Prepare here, once per session (wheels are ignored by git, carried by the device tool):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata==8.7.0
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=570)
set -u
OUT=${OUT:-/tmp/cpfx-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"

# The repo root must not be on sys.path (its cpfx/ lacks the mapped passes/ and kernels/).
(cd tests && timeout 180 python3 -m pytest -q --import-mode=append --rootdir=.. \
    test_gpu.py test_fp8_kernels.py -k "gpu or cuda" 2>&1) | tee "$OUT/tests.log"

# Two ranks share GPU 0 over gloo (CUDA all-to-all through host memory): compute on the GPU while
# gloo's threads move the bytes, so the schedule's overlap is measurable on one GPU.
for block in double single; do
    timeout 120 python3 benchmarks/overlap.py --device cuda --backend gloo --block "$block" \
        --tokens 8192 --txt 512 --heads 24 --head-dim 128 --json "$OUT/overlap_$block.json" 2>&1 \
        | tee "$OUT/overlap_$block.log"
done

timeout 200 python3 benchmarks/perf_model.py --device cuda --worlds 2,4,8 \
    --json "$OUT/perf_model.json" 2>&1 | tee "$OUT/perf_model.log"
