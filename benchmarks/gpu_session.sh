#!/usr/bin/env bash
# Every GPU check of cpfx in one script, about 9 minutes on one H200: the overlap benchmark (eager
# and inductor), the performance model's GPU parts and the GPU tests. Writes a log (gpu.log) and
# five JSON files to $OUT (default /tmp/cpfx-gpu-out); dated results are in benchmarks/RESULTS.md.
#
# Needs one CUDA GPU, torch and triton. cpfx is installed into /tmp/site, together with any
# wheels found in .whl/: on a machine without a package index, bring diffusers that way, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata==8.7.0
# Run from the repository root: bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/cpfx-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
LOG=$OUT/gpu.log
exec > >(tee -a "$LOG") 2>&1
nvidia-smi -L
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"


# Two ranks share GPU 0 over gloo (CUDA all-to-all through host memory): compute on the GPU while
# gloo's threads move the bytes, so the schedule's overlap is measurable on one GPU.
FLUX="--tokens 8192 --txt 512 --heads 24 --head-dim 128 --dtype bfloat16 --device cuda --backend gloo"
timeout 100 python3 benchmarks/overlap.py $FLUX --block double --json "$OUT/overlap_double.json"
timeout 90 python3 benchmarks/overlap.py $FLUX --block single --json "$OUT/overlap_single.json"
timeout 140 python3 benchmarks/overlap.py $FLUX --block double --compile \
    --json "$OUT/overlap_double_inductor.json"

# Per-rank compute for N = 2, 4, 8 under the fake group (one GPU is enough), eager with profiles
# of N = 2 and 8, then through inductor.
timeout 100 python3 benchmarks/perf_model.py --device cuda --worlds 2,4,8 --profile 2,8 \
    --json "$OUT/perf_model_eager.json"
timeout 150 python3 benchmarks/perf_model.py --device cuda --worlds 2,8 --compile \
    --json "$OUT/perf_model_inductor.json"

# The repo root must not be on sys.path (its cpfx/ lacks the mapped passes/ and kernels/).
(cd tests && timeout 60 python3 -m pytest -q --import-mode=append --rootdir=.. \
    test_gpu.py test_fp8_kernels.py -k "gpu or cuda")
