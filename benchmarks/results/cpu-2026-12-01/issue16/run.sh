#!/usr/bin/env bash
# Issue 16 quality runs (SmolLM2-135M-Instruct, CPU, fp32 compute): one lane of `python -m kvtier.eval`
# commands, each writing its JSON here; then post.py adds the command and the kv-quant keys.
# usage: run.sh LANE_FILE   (one "NAME ARGS..." per line)
set -u
cd "$(dirname "$0")/../../../.."
D=benchmarks/results/cpu-2026-12-01/issue16
mkdir -p "$D/logs"
COMMON="--max-model-len 8192 --kv-cache-memory 2GiB --kv-offloading-size 2 --cpu-threads 1"
while read -r name args; do
  [ -z "$name" ] && continue
  cmd="python -m kvtier.eval $args $COMMON --output-json $D/$name.json"
  echo "== $name: $cmd"
  start=$(date +%s)
  $cmd > "$D/logs/$name.log" 2>&1 && python "$D/post.py" "$D/$name.json" "$cmd"
  echo "== $name rc=$? $(( $(date +%s) - start ))s"
done < "$1"
