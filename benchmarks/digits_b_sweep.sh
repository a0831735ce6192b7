#!/usr/bin/env bash
# Issue 11, item 5: which b (reverse steps) does best on the digits model at the paper's K = 10.
# Same images, noise and statistics as benchmarks/digits_experiment.sh (n0 = 100, n = 500,
# alpha = 0.001, every 9th test image, seed 0); one certify run per (b, sigma) pair in $PAIRS.
# Wall times (this machine, whatever else ran on it) go to $OUT/sweep_wall_times.tsv.
# Usage: PAIRS="1:0.25 1:0.5 2:0.25 2:0.5 10:0.25" bash benchmarks/digits_b_sweep.sh [OUT]
set -euo pipefail
OUT=${1:-benchmarks/results/digits_k10}
ENGINE=${ENGINE:-engines/digits}
K=${K:-10}
PAIRS=${PAIRS:-"1:0.25 1:0.5 2:0.25 2:0.5 10:0.25"}
mkdir -p "$OUT"
[ -f "$ENGINE/manifest.json" ] || densepure-rt build --model digits --out "$ENGINE"
[ -f "$OUT/sweep_wall_times.tsv" ] || printf 'method\tsigma\tsteps\tvotes\tseconds\n' > "$OUT/sweep_wall_times.tsv"
for pair in $PAIRS; do
  b=${pair%%:*} sigma=${pair##*:}
  name=densepure_b${b}_k${K}
  start=$(date +%s.%N)
  densepure-rt certify --engine "$ENGINE" --sigma "$sigma" --steps "$b" --votes "$K" \
    --n0 100 --n 500 --alpha 0.001 --skip 9 --seed 0 --quiet --resume --out "$OUT/${name}_sigma$sigma.tsv"
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\t%.1f\n' "$name" "$sigma" "$b" "$K" "$(echo "$end - $start" | bc)" >> "$OUT/sweep_wall_times.tsv"
done
for sigma in 0.25 0.5; do
  densepure-rt report "$OUT"/*_sigma$sigma.tsv --radii 0,0.25,0.5,0.75,1.0 --json "$OUT/table_sigma$sigma.json"
done
