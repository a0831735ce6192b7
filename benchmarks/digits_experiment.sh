#!/usr/bin/env bash
# The digits experiment (docs/benchmarks.md): certified accuracy of
#   (a) the classifier alone under Gaussian noise (plain randomized smoothing, --steps none),
#   (b) one-shot denoising (Carlini et al. 2022, --steps one-shot),
#   (c) DensePure (--steps $B reverse steps, --votes $K runs voted per noisy sample),
# for sigma 0.25 and 0.5 on the digits test split, with the digits engine shipped in the package
# (or $ENGINE). Results and wall times go to a fresh folder $OUT (default digits-experiment; never
# the recorded results), then are compared row by row with the recorded ones in $RECORDED.
# Usage: bash benchmarks/digits_experiment.sh [OUT]    (DRY_RUN=1: print the commands only)
set -euo pipefail
OUT=${1:-digits-experiment}
RECORDED=${RECORDED:-benchmarks/results/digits}
N0=${N0:-100}
N=${N:-500}
ALPHA=${ALPHA:-0.001}
SKIP=${SKIP:-9}
B=${B:-4}
K=${K:-3}
case "$(realpath -m "$OUT")/" in
  "$(realpath -m benchmarks/results)"/*) [ "${RECORD:-0}" = 1 ] || { echo "error: $OUT is under benchmarks/results (recorded results): give a fresh folder, or RECORD=1 to re-record" >&2; exit 2; } ;;
esac
engine=()
[ -z "${ENGINE:-}" ] || engine=(--engine "$ENGINE")
do_run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }

mkdir -p "$OUT"
: > "$OUT/wall_times.tsv.tmp"
run() {  # name sigma steps votes
  local start end
  start=$(date +%s.%N)
  do_run densepure-rt certify "${engine[@]}" --sigma "$2" --steps "$3" --votes "$4" --n0 "$N0" --n "$N" --alpha "$ALPHA" \
    --skip "$SKIP" --seed 0 --out "$OUT/$1_sigma$2.tsv"
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\t%.1f\n' "$1" "$2" "$3" "$4" "$(echo "$end - $start" | bc)" >> "$OUT/wall_times.tsv.tmp"
}
for sigma in 0.25 0.5; do
  run smoothing "$sigma" none 1
  run onestep "$sigma" one-shot 1
  run "densepure_b${B}_k${K}" "$sigma" "$B" "$K"
  do_run densepure-rt report "$OUT"/*_sigma$sigma.tsv --json "$OUT/table_sigma$sigma.json"
done
{ printf 'method\tsigma\tsteps\tvotes\tseconds\n'; cat "$OUT/wall_times.tsv.tmp"; } > "$OUT/wall_times.tsv"
rm "$OUT/wall_times.tsv.tmp"
do_run densepure-rt report "$OUT"/*_sigma*.tsv --plot "$OUT/curves.png"
do_run python benchmarks/compare_rows.py "$OUT" "$RECORDED"
