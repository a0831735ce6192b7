#!/usr/bin/env bash
# Issue 12, item 6: one process vs two Ray actors on this machine, digits engine, the same
# certify command (fixed n). Wall time of the whole command (Ray's cluster and actor start-up
# included), plus whether the Ray rows equal the single-process rows at the same --threads (all
# columns but `time`). Run on an otherwise idle machine: Ray's workers run at niceness 15.
# Usage: bash benchmarks/ray_bench.sh [OUT]   (REPEAT=2 runs each configuration twice, interleaved)
set -euo pipefail
OUT=${1:-benchmarks/results/ray_cpu}
ENGINE=${ENGINE:-engines/digits}
REPEAT=${REPEAT:-2}
ARGS=(--engine "$ENGINE" --sigma 0.5 --steps 4 --votes 3 --n0 100 --n 500 --alpha 0.001 --skip "${SKIP:-30}" --seed 0 --quiet)
mkdir -p "$OUT"
[ -f "$ENGINE/manifest.json" ] || densepure-rt build --model digits --out "$ENGINE"
{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; ray $(python -c 'import ray; print(ray.__version__)')"
  echo "# other load (1-min load average before the runs): $(cut -d' ' -f1 /proc/loadavg)"
  printf 'config\trepeat\tseconds\n'
} > "$OUT/wall_times.tsv"
run() {  # name repeat args...
  local name=$1 rep=$2; shift 2
  local file="$OUT/$name.tsv"
  rm -f "$file" "$file.json"
  local start end
  start=$(date +%s.%N)
  densepure-rt certify "${ARGS[@]}" "$@" --out "$file"
  end=$(date +%s.%N)
  printf '%s\t%s\t%.1f\n' "$name" "$rep" "$(echo "$end - $start" | bc)" >> "$OUT/wall_times.tsv"
}
for rep in $(seq 1 "$REPEAT"); do
  run one_process_2threads "$rep" --threads 2
  run one_process_1thread "$rep" --threads 1
  run ray_2actors "$rep" --ray local --actors 2
done
strip() { cut -f1-5,7- "$1" | sort -n; }  # every column but `time` (the 6th), in image order
if diff <(strip "$OUT/ray_2actors.tsv") <(strip "$OUT/one_process_1thread.tsv") > /dev/null; then
  echo "ray_2actors rows == one_process_1thread rows (all columns but time)" > "$OUT/rows.txt"
else
  echo "ray_2actors rows DIFFER from one_process_1thread rows" > "$OUT/rows.txt"
fi
if diff <(strip "$OUT/one_process_2threads.tsv") <(strip "$OUT/one_process_1thread.tsv") > /dev/null; then
  echo "one_process_2threads rows == one_process_1thread rows" >> "$OUT/rows.txt"
else
  echo "one_process_2threads rows differ from one_process_1thread rows (ONNX Runtime rounding with 2 threads)" >> "$OUT/rows.txt"
fi
cat "$OUT/wall_times.tsv" "$OUT/rows.txt"
