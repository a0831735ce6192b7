#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): assemble onnxruntime-gpu from the carried parts,
# run the gpu tests, build random-weight engines and time the lean runtime. Everything lands in $OUT.
#   Part 1 of onnxruntime-gpu travels in an earlier call (copied to /tmp/ortparts), part 2 in this one
#   (.ortgpu_b/); made by benchmarks/ort_gpu_parts.py (the sm_90 kernels only).
set -uo pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
log() { echo "[$(elapsed) s] $*"; }

mkdir -p /tmp/ortparts /tmp/site
cp .ortgpu_*/part_* /tmp/ortparts/ 2>/dev/null
ls -la /tmp/ortparts
if [ -f /tmp/ortparts/part_aa ] && [ -f /tmp/ortparts/part_ab ]; then
  cat /tmp/ortparts/part_aa /tmp/ortparts/part_ab | xz -dc | tar -x -C /tmp/site && log "onnxruntime-gpu unpacked"
else
  log "onnxruntime-gpu parts missing: the CUDA executor tests will skip"
fi
export PYTHONPATH=/tmp/site
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(ls -d $SP/nvidia/*/lib $SP/nvidia/*/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 - <<'PY'
import onnxruntime as ort, cupy
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
PY
# The next GPU session's checklist: SECTIONS="tests sched" in one call, SECTIONS="fused" in the
# next, SECTIONS="sched_in" (ImageNet with early exit) if device time is left. runtime_bench times the
# scheduler (the one sampling path); the records of the earlier runs name the loop they timed.
SECTIONS=${SECTIONS:-"tests sched"}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
mkdir -p /tmp/eng
if has tests; then
  log "gpu tests: ${GPU_TESTS:-tests}"
  python3 -m pytest -q -rs -s -m gpu ${GPU_TESTS:-tests} 2>&1 | tee $OUT/gpu_tests.txt | tail -25
fi
if has c16 || has nhwc; then
  log "build cifar10 fp16"
  densepure-rt build --model cifar10 --random-weights --precision fp16 --no-validate --out /tmp/eng/cifar10-rand16 2>&1 | tail -1
fi
if has c16; then
  log "bench cifar10 fp16"
  python3 benchmarks/runtime_bench.py --engine /tmp/eng/cifar10-rand16 --device cuda --batch 25 200 --early-exit both \
    --cuda-graph both --seconds 4 --out $OUT --name cifar10_fp16 2>&1 | tail -9
fi
if has nhwc; then
  log "bench cifar10 fp16, ONNX Runtime prefer_nhwc"
  DENSEPURE_ORT_PREFER_NHWC=1 python3 benchmarks/runtime_bench.py --engine /tmp/eng/cifar10-rand16 --device cuda \
    --batch 200 --early-exit off --cuda-graph on --seconds 4 --out $OUT --name cifar10_fp16_nhwc 2>&1 | tail -3
fi
if has c32; then
  log "build cifar10 fp32"
  densepure-rt build --model cifar10 --random-weights --no-validate --out /tmp/eng/cifar10-rand32 2>&1 | tail -1
  python3 benchmarks/runtime_bench.py --engine /tmp/eng/cifar10-rand32 --device cuda --batch 200 --early-exit off \
    --cuda-graph on --seconds 4 --out $OUT --name cifar10_fp32 2>&1 | tail -3
fi
if has in16; then
  log "build imagenet fp16"
  timeout 240 densepure-rt build --model imagenet --random-weights --precision fp16 --no-validate \
    --out /tmp/eng/imagenet-rand16 2>&1 | tail -2
  log "bench imagenet fp16"
  timeout $(( 570 - $(elapsed) )) python3 benchmarks/runtime_bench.py --engine /tmp/eng/imagenet-rand16 --device cuda \
    --batch 3 --early-exit off --cuda-graph on --seconds 10 --out $OUT --name imagenet_fp16 2>&1 | tail -3
fi
if has sched; then
  # The scheduler on the GPU with the vote's early exit.
  log "build cifar10 fp16"
  [ -d /tmp/eng/cifar10-rand16 ] || densepure-rt build --model cifar10 --random-weights --precision fp16 --no-validate \
    --out /tmp/eng/cifar10-rand16 2>&1 | tail -1
  log "bench cifar10 fp16: the scheduler, early exit on"
  python3 benchmarks/runtime_bench.py --engine /tmp/eng/cifar10-rand16 --device cuda --batch 25 200 --early-exit on \
    --cuda-graph on --seconds 4 --out $OUT --name cifar10_sched 2>&1 | tail -6
fi
if has sched_in; then
  # ImageNet fp16 with the vote's early exit, the scheduler at the largest safe row count
  # (63 rows: 6 samples x K 10 = 60; 0.2.0's wave loop idled the H100 at 61 ms per UNet eval per row).
  log "build imagenet fp16"
  [ -d /tmp/eng/imagenet-rand16 ] || timeout 240 densepure-rt build --model imagenet --random-weights --precision fp16 \
    --no-validate --out /tmp/eng/imagenet-rand16 2>&1 | tail -1
  log "bench imagenet fp16: the scheduler, early exit on"
  timeout $(( 570 - $(elapsed) )) python3 benchmarks/runtime_bench.py --engine /tmp/eng/imagenet-rand16 --device cuda \
    --batch 6 --early-exit on --cuda-graph on --seconds 10 --out $OUT --name imagenet_sched 2>&1 | tail -4
fi
if has fused; then
  # Issue 23: the fused GPU graphs (build --device cuda) against the portable ones, and cuDNN's search modes.
  log "build cifar10 fp16 --device cuda"
  densepure-rt build --model cifar10 --random-weights --precision fp16 --device cuda --no-validate \
    --out /tmp/eng/cifar10-cuda16 2>&1 | tail -1
  log "gpu tests of the fused graphs"
  python3 -m pytest -q -rs -s -m gpu tests/test_fusion.py tests/test_classifier_fp16.py 2>&1 | tee $OUT/gpu_tests_fused.txt | tail -8
  log "bench cifar10 fp16: portable vs fused, EXHAUSTIVE vs HEURISTIC"
  python3 benchmarks/runtime_bench.py --engine /tmp/eng/cifar10-cuda16 --device cuda --batch 200 --early-exit off \
    --cuda-graph on --kernels both --cudnn-search both --seconds 4 --out $OUT --name cifar10_fused 2>&1 | tail -6
  DENSEPURE_ORT_PREFER_NHWC=1 python3 benchmarks/runtime_bench.py --engine /tmp/eng/cifar10-cuda16 --device cuda \
    --batch 200 --early-exit off --cuda-graph on --kernels fused --seconds 4 --out $OUT --name cifar10_fused_nhwc 2>&1 | tail -3
  log "build imagenet fp16 --device cuda"
  timeout 300 densepure-rt build --model imagenet --random-weights --precision fp16 --device cuda --no-validate \
    --out /tmp/eng/imagenet-cuda16 2>&1 | tail -1
  log "bench imagenet fp16: portable vs fused"
  timeout $(( 570 - $(elapsed) )) python3 benchmarks/runtime_bench.py --engine /tmp/eng/imagenet-cuda16 --device cuda \
    --batch 3 --early-exit off --cuda-graph on --kernels both --seconds 8 --out $OUT --name imagenet_fused 2>&1 | tail -4
fi
if has final; then
  # The runtime and the PyTorch paths in one call, on one machine.
  RB="python3 benchmarks/runtime_bench.py --device cuda --out $OUT --name h100 --append --cuda-graph on"
  log "build cifar10 fp16 + fp32"
  densepure-rt build --model cifar10 --random-weights --precision fp16 --no-validate --out /tmp/eng/cifar10-rand16 2>&1 | tail -1
  densepure-rt build --model cifar10 --random-weights --no-validate --out /tmp/eng/cifar10-rand32 2>&1 | tail -1
  log "runtime cifar10"
  $RB --engine /tmp/eng/cifar10-rand16 --batch 200 --early-exit both --seconds 4 2>&1 | tail -3
  $RB --engine /tmp/eng/cifar10-rand32 --batch 50 --early-exit off --seconds 4 2>&1 | tail -2
  log "pytorch cifar10"
  python3 benchmarks/gpu_bench.py --preset cifar10 --out $OUT/pt --budget-s 120 2>&1 | grep -E "^ +[0-9.]+s" | tail -8
  log "build imagenet fp16"
  timeout 200 densepure-rt build --model imagenet --random-weights --precision fp16 --no-validate \
    --out /tmp/eng/imagenet-rand16 2>&1 | tail -1
  log "runtime imagenet"
  timeout $(( 525 - $(elapsed) )) $RB --engine /tmp/eng/imagenet-rand16 --batch 3 --early-exit both --seconds 8 2>&1 | tail -4
fi
log "done"
