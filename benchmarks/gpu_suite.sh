#!/usr/bin/env bash
# Every GPU check and benchmark in one call (run from the repo root on the GPU machine):
#   1. Triton kernels vs the fp32 reference at full sizes, and their timings
#   2. greedy tokens on the GPU (Triton attention + CUDA graphs, fp32) equal HF transformers'
#   3. Llama-3-8B-shape benchmarks: decode roofline, prefill MFU, throughput vs HF
# Results go to $OUT (default ./out); copy the JSON you rely on to benchmarks/results/.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log="$OUT/suite.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "== 1. kernels"
  python3 benchmarks/kernels_gpu.py --out "$OUT" || echo "KERNELS FAILED rc=$?"
  echo "== 2. greedy equality with HF on the GPU"
  python3 -m pytest -q -x -p no:cacheprovider tests/test_hf_equality.py tests/test_engine_invariance.py \
      tests/test_sampling.py || echo "GPU TESTS FAILED rc=$?"
  echo "== 3. benchmarks"
  python3 benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} || echo "BENCH FAILED rc=$?"
} 2>&1 | tee "$log"
