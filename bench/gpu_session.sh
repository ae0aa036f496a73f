#!/usr/bin/env bash
# One lease of the two-GPU machine (`nvidia-h200-x2`), planned so that both GPUs measure all
# the time. After bench/device.sh's stage1 and stage2 calls:
#
#   source bench/device.sh env && bash bench/gpu_session.sh launch   # starts the two tracks
#   bash bench/gpu_session.sh wait SECONDS     # any later call: wait, then pack the results
#   bash bench/gpu_session.sh scaling          # after the tracks, a call each: the two-GPU
#   bash bench/gpu_session.sh cluster          # benches
#
# Track 0 (GPU 0, the first half of the cores: 16, as the one-GPU machine has): the GPU tests
# (GPU_TESTS: which, default all), then the live path as `dvp serve` runs it
# (bench/latency.py: 4 sessions at 512 in one process, each sent 30 fps; one session at 512
# with the torch landmarks), the offline
# commands (bench/offline.py: dvp prepare, dvp reenact), then the engine fed as fast as taken
# (bench/pipeline.py at 512 with 4 sessions).
# Track 1 (GPU 1, the other half): the offline commands with the photometric refinement on
# (renderer.refine=true), then (unless SKIP_VIDEO is set) tracking against ground truth
# (bench/tracker.py --video: 3 `dvp synth` actors of 1,500 frames at 256, then at 512,
# landmark-only and refined).
# `scaling`: training throughput on one and two GPUs (bench/generator.py --scaling);
# `cluster`: sessions across the GPUs through `dvp serve --ray local` (bench/cluster.py: one
# GPU, then two, WORKERS_PER_GPU worker processes on each, default 4, holding PER_GPU
# sessions of 256 px per GPU, default 8, the clients sending WIDTH px wide frames, default 320,
# as they share the host; then a worker killed).
#
# The tracks run in their own process sessions (setsid), so they outlive the call that
# started them while the machine stays warm: it goes back 30 s after a call ends, and the
# tracks with it, so make the `wait` calls back to back; every result is a JSON or log file under
# /tmp/results, packed into $OUT/results.tgz by `wait`, `scaling` and `cluster`.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
R=/tmp/results

step() {  # step NAME TIMEOUT COMMAND...: run, keep stdout as NAME.json and stderr as NAME.log
    local name=$1 limit=$2
    shift 2
    echo "$(date +%T) start $name" >> "$R/progress"
    timeout "$limit" "$@" > "$R/$name.json" 2> "$R/$name.log"
    echo "$(date +%T) end $name rc $?" >> "$R/progress"
}

track0() {
    export CUDA_VISIBLE_DEVICES=0
    step gpu_tests 420 python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests}
    step sessions512 200 python3 bench/latency.py --size 512 --sessions 4 --seconds 30 --no-baseline
    step latency512 180 python3 bench/latency.py --size 512 --seconds 30
    step offline 420 python3 bench/offline.py --device cuda
    step pipeline 240 python3 bench/pipeline.py --sizes 512 --sessions 4
    echo "$(date +%T) track0 done" >> "$R/progress"
}

track1() {
    export CUDA_VISIBLE_DEVICES=1
    step offline_refine 420 python3 bench/offline.py --device cuda --set renderer.refine=true
    if [ -z "${SKIP_VIDEO:-}" ]; then
        step tracker_video256 560 python3 bench/tracker.py --video --res 256 --frames 1500 \
            --seeds 3 --device cuda
        step tracker_video512 560 python3 bench/tracker.py --video --res 512 --frames 1500 \
            --seeds 3 --device cuda
    fi
    echo "$(date +%T) track1 done" >> "$R/progress"
}

pack() {
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/results.tgz" -C "$R" . 2>/dev/null
    cp "$R/progress" "$OUT/progress.txt" 2>/dev/null
}

cd "$ROOT"
case "${1:-}" in
launch)
    # the tracks run from a snapshot of the repo: every later call of the device tool copies
    # the working tree again, and a file missing for a moment fails a step starting then
    pkill -9 -f "gpu_session.sh track" 2>/dev/null; pkill -9 -f "python3 .*bench/" 2>/dev/null
    pkill -9 -f "pytest" 2>/dev/null
    SNAP=/tmp/dvp-repo
    rm -rf "$SNAP" "$R" && mkdir -p "$SNAP" "$R" /tmp/shared
    tar -C "$ROOT" --exclude=.whl --exclude=.devrun --exclude=.git -cf - . | tar -C "$SNAP" -xf -
    ln -sfn /tmp/dvp-assets /tmp/shared/assets && ln -sfn /tmp/dvp-media /tmp/shared/media
    export PYTHONPATH=/tmp/site:$SNAP
    half=$(( $(nproc) / 2 ))
    pin0=() pin1=()
    if command -v taskset > /dev/null && [ "$half" -ge 2 ]; then
        pin0=(taskset -c "0-$((half - 1))") pin1=(taskset -c "$half-$((2 * half - 1))")
    fi
    setsid "${pin0[@]}" bash "$SNAP/bench/gpu_session.sh" track0 > "$R/track0.out" 2>&1 < /dev/null &
    setsid "${pin1[@]}" bash "$SNAP/bench/gpu_session.sh" track1 > "$R/track1.out" 2>&1 < /dev/null &
    sleep 2
    cat "$R/progress"
    ;;
track0) track0 ;;
track1) track1 ;;
wait)
    limit=${2:-540}
    end=$(( $(date +%s) + limit ))
    while [ "$(date +%s)" -lt "$end" ]; do
        grep -q "track0 done" "$R/progress" && grep -q "track1 done" "$R/progress" && break
        sleep 5
    done
    pack
    cat "$R/progress"
    ;;
scaling)
    step scaling 560 python3 bench/generator.py --scaling --gpus 2 --steps 60 --timeout 100
    pack
    cat "$R/progress"
    ;;
cluster)
    step cluster 560 python3 bench/cluster.py --seconds 20 --size 256 \
        --workers-per-gpu "${WORKERS_PER_GPU:-4}" --per-gpu "${PER_GPU:-8}" --width "${WIDTH:-320}" \
        --out "$R/cluster_phases.json"
    pack
    cat "$R/progress"
    ;;
*)
    echo "usage: bench/gpu_session.sh launch | wait SECONDS | scaling | cluster" >&2
    exit 2
    ;;
esac
