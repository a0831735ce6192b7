#!/usr/bin/env bash
# The README's digits experiment: certified accuracy of
#   (a) the classifier alone under Gaussian noise (plain randomized smoothing, --steps none),
#   (b) one-shot denoising (Carlini et al. 2022, --steps one-shot),
#   (c) DensePure (--steps $B reverse steps, --votes $K runs voted per noisy sample),
# for sigma 0.25 and 0.5 on the digits test split, all with the CLI. Results and wall times go to
# $OUT (default benchmarks/results/digits). Usage: bash benchmarks/digits_experiment.sh [OUT]
set -euo pipefail
OUT=${1:-benchmarks/results/digits}
ENGINE=${ENGINE:-engines/digits}
N0=${N0:-100}
N=${N:-500}
ALPHA=${ALPHA:-0.001}
SKIP=${SKIP:-9}
B=${B:-4}
K=${K:-3}
mkdir -p "$OUT"
[ -f "$ENGINE/manifest.json" ] || densepure-rt build --model digits --out "$ENGINE"
densepure-rt info --engine "$ENGINE"

: > "$OUT/wall_times.tsv.tmp"
run() {  # name sigma steps votes
  local file="$OUT/$1_sigma$2.tsv" start end
  start=$(date +%s.%N)
  densepure-rt certify --engine "$ENGINE" --sigma "$2" --steps "$3" --votes "$4" \
    --n0 "$N0" --n "$N" --alpha "$ALPHA" --skip "$SKIP" --seed 0 --quiet --out "$file"
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\t%.1f\n' "$1" "$2" "$3" "$4" "$(echo "$end - $start" | bc)" >> "$OUT/wall_times.tsv.tmp"
}
for sigma in 0.25 0.5; do
  run smoothing "$sigma" none 1
  run onestep "$sigma" one-shot 1
  run densepure_b${B}_k${K} "$sigma" "$B" "$K"
done
{ printf 'method\tsigma\tsteps\tvotes\tseconds\n'; cat "$OUT/wall_times.tsv.tmp"; } > "$OUT/wall_times.tsv"
rm "$OUT/wall_times.tsv.tmp"
for sigma in 0.25 0.5; do
  densepure-rt report "$OUT"/*_sigma$sigma.tsv --radii 0,0.25,0.5,0.75,1.0 --json "$OUT/table_sigma$sigma.json"
done
densepure-rt report "$OUT"/densepure_*.tsv "$OUT"/onestep_*.tsv "$OUT"/smoothing_*.tsv --plot "$OUT/curves.png"
