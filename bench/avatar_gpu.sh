#!/usr/bin/env bash
# Issue 16's GPU figures in one resumable command (run from the repository root, after
# bench/device.sh's two set-up calls, in the same warm lease):
#
#   source bench/device.sh env && bash bench/avatar_gpu.sh /tmp/avatar ../shared/media 540
#
# 1. `bench/generator.py --scaling --gpus 2` (when two GPUs are visible and it has not run):
#    paper-network training throughput at 256 on one and two GPUs (weak scaling, eager and
#    CUDA graph) beside the issue-8 baseline, ~2.5 minutes;
# 2. at the same time, on GPU 0, franck's first 60 s (MEDIA/franck_talking_200s.webm):
#    prepare at 256 (timed), train `paper`, held-out report after 3 and after 10 minutes of
#    training; on GPU 1 (or after it, with one GPU) a `dvp synth` actor of 1,500 frames:
#    synth + prepare (timed), held-out report after 6 minutes of training.
#
# Everything keeps its state under WORK: a call that reaches BUDGET_SECONDS (default 540)
# stops with checkpoints, and the same command again goes on from there (two calls of ten
# minutes finish it). A call with 150 s to spare at its end runs this GPU tests
# (once). Each call prints the JSON reached so far, and copies it (and the last sample
# grids, the test log) into $OUT when that is set.
set -uo pipefail
WORK=${1:?usage: bench/avatar_gpu.sh WORK [MEDIA] [BUDGET_SECONDS]}
MEDIA=${2:-../shared/media}
BUDGET=${3:-540}
mkdir -p "$WORK"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python -c "import torch; print(torch.cuda.device_count())")

if [ "$gpus" -ge 2 ] && [ ! -s "$WORK/scaling.json" ]; then
  python bench/generator.py --scaling --gpus 2 --steps 60 --timeout 120 > "$WORK/scaling.json.partial" \
    2> "$WORK/scaling.log" && mv "$WORK/scaling.json.partial" "$WORK/scaling.json"
fi
left=$(( BUDGET - ($(date +%s) - start) ))

franck() {
  python bench/generator.py --quality --video "$MEDIA/franck_talking_200s.webm" --seconds 60 \
    --size 256 --preset paper --eval-minutes 3 10 --work "$WORK/franck" \
    --budget-seconds "$1" > "$WORK/franck.json" 2> "$WORK/franck.log"
}
synth() {
  python bench/generator.py --quality --frames 1500 --synth-size 320 --size 256 \
    --preset paper --eval-minutes 6 --work "$WORK/synth" \
    --budget-seconds "$1" > "$WORK/synth.json" 2> "$WORK/synth.log"
}
if [ "$gpus" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 franck "$left" &
  CUDA_VISIBLE_DEVICES=1 synth "$left" &
  wait
else
  franck "$left"
  synth $(( BUDGET - ($(date +%s) - start) ))
fi

# spare time at the end of a call: this GPU tests (graph step, CUDA training, NCCL)
if [ $(( BUDGET - ($(date +%s) - start) )) -gt 150 ] && [ ! -s "$WORK/gpu-tests.log" ]; then
  timeout 140 python -m pytest -q -p no:cacheprovider -m gpu \
    tests/generator/test_training_options.py tests/generator/test_gan_training.py \
    tests/generator/test_ddp.py > "$WORK/gpu-tests.log" 2>&1
fi
[ -s "$WORK/gpu-tests.log" ] && { echo "== gpu tests"; tail -5 "$WORK/gpu-tests.log"; }

for f in scaling franck synth; do
  if [ -s "$WORK/$f.json" ]; then echo "== $f"; cat "$WORK/$f.json"; else echo "== $f: no JSON yet"; tail -5 "$WORK/$f.log" 2>/dev/null; fi
done
if [ -n "${OUT:-}" ]; then
  for f in scaling franck synth; do [ -s "$WORK/$f.json" ] && cp "$WORK/$f.json" "$OUT/"; done
  [ -s "$WORK/gpu-tests.log" ] && cp "$WORK/gpu-tests.log" "$OUT/"
  for run in franck synth; do
    grid=$(ls "$WORK/$run/runs/default/samples/"step-*.png 2>/dev/null | tail -1)
    [ -n "$grid" ] && cp "$grid" "$OUT/$run-samples.png"
  done
fi
