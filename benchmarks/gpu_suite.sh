#!/usr/bin/env bash
# Every GPU check and benchmark in one call (run from the repo root on the GPU machine):
#   kernels   Triton kernels vs the fp32 reference at full sizes, and their timings
#   equality  greedy tokens on the GPU (Triton attention + CUDA graphs, fp32) equal HF transformers';
#             the CPU tier on and off gives the same tokens; the transfer kernel is byte-exact
#   bench     Llama-3-8B-shape benchmarks: decode roofline, prefill MFU, throughput vs HF
#   transfer  KV block transfer alternatives (UVA kernel, per-row, per-block, staged DMA) and overlap
#   tier      the engine's CPU tier: reload/store rates, overlap with a forward, TTFT of a CPU hit
#   multiturn multi-turn conversations with the CPU tier on and off
#   expansion Pie: decode step at far fractions 0-16% of the KV (CPU tier over PCIe), beside the model
#   kvpr      KVPR: FlexGen (the peer; .peers/ holds its wheel and runner, see ../shared/peers/README.md),
#             then OPT-13B decode with all active KV in the CPU tier, full transfer vs KVPR, and a
#             4096-token CPU-tier prefix hit; Llama-3-8B (GQA) the same (the planner must choose l = 0)
#   newops    the KCache decode op and the int8/int4/fp8 KV formats: their tests on the GPU (compiled
#             kernels against the references), then their timings (kcache.json, kv_quant.json)
#   fp8       decode 64 x 2048 with the GPU cache in bf16 and in fp8 (--kv-cache-dtype), one engine each
#   quant     TTFT of a 4096-token CPU-tier prefix hit with the tier in bf16, int8, int4 vs recompute
#   profile   (not in the default) decode steps kernel by kernel at 64 x 2048 and 256 x 512, and sampled
# SECTIONS picks some (default: all), e.g. SECTIONS="equality tier" bash benchmarks/gpu_suite.sh
# Results go to $OUT (default ./out); copy the JSON you rely on to benchmarks/results/.
set -uo pipefail
OUT=${OUT:-out}
SECTIONS=${SECTIONS:-"kernels newops equality bench transfer tier multiturn expansion kvpr fp8 quant"}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log="$OUT/suite.log"
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# ShareGPT conversations tokenized here beforehand (the GPU machine has no dataset): see benchmarks/data/README.md
MULTITURN_DEFAULT="--model llama3-8b --load-format dummy --skip-tokenizer-init --max-model-len 8192
  --conversations-file benchmarks/data/sharegpt_multiturn_64x6.json --num-conversations 64 --max-active 32
  --think-time 1.0 --gpu-kv-fraction 0.25 --kv-offloading-size 12 --warmup-conversations 16"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  if want kernels; then
    echo "== kernels"
    python3 benchmarks/kernels_gpu.py --out "$OUT" || echo "KERNELS FAILED rc=$?"
  fi
  if want newops; then
    echo "== KCache op and KV quantization formats: compiled kernels vs references, then timings"
    python3 -m pytest -q -x -p no:cacheprovider tests/test_kcache_op.py tests/test_kv_quant.py || echo "NEWOPS TESTS FAILED rc=$?"
    python3 benchmarks/kcache_gpu.py --out "$OUT/kcache.json" || echo "KCACHE BENCH FAILED rc=$?"
    python3 benchmarks/kv_quant_gpu.py --out "$OUT/kv_quant.json" || echo "KV QUANT BENCH FAILED rc=$?"
  fi
  if want equality; then
    echo "== greedy equality on the GPU (HF; CPU tier on/off) and transfer exactness"
    python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_hf_equality.py tests/test_engine_invariance.py \
        tests/test_sampling.py tests/test_cpu_tier.py tests/test_kv_transfer.py} -k "not smollm2" \
        || echo "GPU TESTS FAILED rc=$?"
  fi
  if want bench; then
    echo "== throughput benchmarks"
    python3 benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} || echo "BENCH FAILED rc=$?"
  fi
  if want transfer; then
    echo "== transfer alternatives"
    python3 benchmarks/transfer_gpu.py --out "$OUT/transfer.json" || echo "TRANSFER FAILED rc=$?"
  fi
  if want tier; then
    echo "== CPU tier"
    python3 benchmarks/tier_gpu.py --out "$OUT/tier.json" || echo "TIER FAILED rc=$?"
  fi
  if want profile; then
    echo "== decode steps kernel by kernel"
    python3 benchmarks/profile_forward.py --batch 64 --input-len 2048 --out "$OUT/profile_64x2048.json" || echo "PROFILE FAILED rc=$?"
    python3 benchmarks/profile_forward.py --batch 256 --input-len 512 --out "$OUT/profile_256x512.json" || echo "PROFILE FAILED rc=$?"
    python3 benchmarks/profile_forward.py --batch 64 --input-len 2048 --temperature 1.0 \
        --out "$OUT/profile_64x2048_sampled.json" || echo "PROFILE FAILED rc=$?"
  fi
  if want expansion; then
    echo "== Pie: far fraction sweep"
    python3 -m kvtier.cli bench expansion --model llama3-8b --load-format dummy --skip-tokenizer-init \
        --max-model-len 4096 --max-num-seqs 64 --max-num-batched-tokens 16384 --kv-offloading-size 24 \
        --kv-expansion 0.16 --batch 64 --input-len 2048 --steps 20 ${EXPANSION_ARGS:-} \
        --output-json "$OUT/expansion.json" --plot "$OUT/expansion.png" || echo "EXPANSION FAILED rc=$?"
    echo "== Pie: capacity (KV 1.25x the GPU pool; recompute, swap, adaptive expansion)"
    python3 -m kvtier.cli bench expansion --no-sweep --model llama3-8b --load-format dummy --skip-tokenizer-init \
        --max-model-len 4096 --max-num-seqs 256 --max-num-batched-tokens 16384 --kv-offloading-size 48 \
        --kv-expansion adaptive --capacity-prompts 128 --capacity-input-len 2048 --capacity-output-len 512 \
        --output-json "$OUT/expansion_capacity.json" || echo "CAPACITY FAILED rc=$?"
  fi
  if want kvpr; then
    flexgen_tok_s=""
    if [[ -f .peers/flexgen-0.1.8-py3-none-any.whl && " ${KVPR_PARTS:-flexgen opt llama} " == *" flexgen "* ]]; then
      echo "== KVPR: FlexGen 0.1.8, OPT-13B dummy weights, KV in CPU memory (100 0 0 100 100 0), 32 x 2"
      python3 -m pip install -q --no-index --no-deps --target /tmp/flexgen_site .peers/flexgen-0.1.8-py3-none-any.whl
      PYTHONPATH=/tmp/flexgen_site:$PYTHONPATH python3 .peers/run_flexgen.py --model facebook/opt-13b --path _DUMMY_ \
          --percent 100 0 0 100 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 32 \
          > "$OUT/flexgen.log" 2>&1 || echo "FLEXGEN FAILED rc=$?"
      tail -5 "$OUT/flexgen.log"
      flexgen_tok_s=$(grep -oP 'decode throughput: \K[0-9.]+' "$OUT/flexgen.log" | tail -1)
    fi
    KVPR_ARGS="--load-format dummy --skip-tokenizer-init --max-model-len 1024 --max-num-seqs 64 --batch 64
      --input-len 512 --output-len 32 ${flexgen_tok_s:+--flexgen-decode-tok-s $flexgen_tok_s}"
    if [[ " ${KVPR_PARTS:-flexgen opt llama} " == *" opt "* ]]; then
      echo "== KVPR: OPT-13B, all active KV in the CPU tier: full transfer vs KVPR; a 4096-token prefix hit"
      python3 -m kvtier.cli bench kvpr --model opt-13b $KVPR_ARGS --kv-offloading-size 48 ${KVPR_OPT_ARGS:-} \
          --output-json "$OUT/kvpr_opt13b.json" || echo "KVPR FAILED rc=$?"
      echo "== KVPR: a 4096-token CPU-tier prefix hit, OPT-13B's shape with 8192 positions: reload, KVPR, recompute"
      python3 -m kvtier.cli bench kvpr --model opt-13b-8k --no-decode --load-format dummy --skip-tokenizer-init \
          --kv-offloading-size 24 --prefix-len ${KVPR_PREFIX_LEN:-4096} --output-json "$OUT/kvpr_prefix_opt13b.json" \
          || echo "KVPR FAILED rc=$?"
    fi
    if [[ " ${KVPR_PARTS:-flexgen opt llama} " == *" llama "* ]]; then
      echo "== KVPR: Llama-3-8B (GQA), same setting: the planner must choose l = 0"
      python3 -m kvtier.cli bench kvpr --model llama3-8b $KVPR_ARGS --kv-offloading-size 24 \
          --output-json "$OUT/kvpr_llama3_8b.json" || echo "KVPR FAILED rc=$?"
    fi
  fi
  if want fp8; then
    echo "== fp8 GPU KV cache against bf16: decode step"
    python3 benchmarks/gpu_bench.py --only ${FP8_SCENARIOS:-decode} --kv-cache-dtypes auto,fp8 --out "$OUT/fp8" \
        || echo "FP8 BENCH FAILED rc=$?"
  fi
  if want quant; then
    echo "== quantized CPU tier: TTFT of a 4096-token prefix hit (bf16, int8, int4) vs recompute"
    python3 benchmarks/quant_tier_gpu.py --out "$OUT/quant_tier.json" || echo "QUANT TIER FAILED rc=$?"
  fi
  if want multiturn; then
    echo "== multi-turn, CPU tier on and off"
    python3 -m kvtier.cli bench multiturn ${MULTITURN_ARGS:-$MULTITURN_DEFAULT} --output-json "$OUT/multiturn.json" \
        --plot "$OUT/multiturn.png" || echo "MULTITURN FAILED rc=$?"
  fi
} 2>&1 | tee "$log"
