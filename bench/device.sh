#!/usr/bin/env bash
# Set up a run on the lent GPU machine (../shared/DEVICE.md), so that device minutes go to
# measuring. The machine has torch, CuPy, onnxruntime and most of the scientific stack, but
# not mediapipe, PyAV, aiortc and friends, and nothing can be fetched there; one call may
# carry 64 MiB. So the wheels and files travel in two calls of one warm lease, into /tmp,
# which stays while the machine is warm.
#
#   bash bench/device.sh fetch        # HERE: download the wheels, copy assets and clips into
#                                     # ignored folders (.whl/a, .whl/b, .devrun/)
#   call 1 (carry .whl/a .devrun/assets):        bash bench/device.sh stage1
#   call 2 (carry .whl/b .devrun/media):         bash bench/device.sh stage2
#   Ray (79 MB, for `dvp serve --ray`), in halves with any two later calls:
#   (carry .whl/r1) bash bench/device.sh ray1;   (carry .whl/r2) bash bench/device.sh ray2
#   later calls:                                 source bench/device.sh env
#
# `env` sets PYTHONPATH (/tmp/site, then the repo), DVP_HOME (/tmp/dvp-home, the face model
# installed from the carried assets), DVP_TEST_HOME/DVP_TEST_ASSETS for the tests, and puts a `dvp` command on PATH. The stages also link ../shared/assets and
# ../shared/media beside the repo there, where the tests and benches look by default.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${DVP_SHARED:-$ROOT/../shared}

device_env() {
    export PYTHONPATH=/tmp/site:$ROOT PYTHONUNBUFFERED=1
    export DVP_HOME=/tmp/dvp-home DVP_TEST_HOME=/tmp/dvp-home DVP_TEST_ASSETS=/tmp/dvp-assets
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    mkdir -p /tmp/bin
    printf '#!/bin/sh\nexec python3 -m streamer.cli.main "$@"\n' > /tmp/bin/dvp
    chmod +x /tmp/bin/dvp
    export PATH=/tmp/bin:$PATH
}

install_wheels() {  # $1: folder of wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$1"/*.whl
}

PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
 --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_31_x86_64
 --platform manylinux_2_34_x86_64"

case "${1:-}" in
fetch)
    cd "$ROOT"
    mkdir -p .whl/a .whl/b .devrun
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $PLATFORMS -d .whl/a \
        mediapipe==0.10.21 protobuf==4.25.9 tflite==2.18.0
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $PLATFORMS -d .whl/b \
        av==18.1.0 aiortc==1.16.0 aioice==0.13.0 pylibsrtp==1.0.0 pyee==13.0.1 \
        google-crc32c==1.9.0 pyopenssl==26.4.0 cryptography==50.0.2 cffi==2.1.1 \
        pycparser==3.12 dnspython==2.9.2 ifaddr==0.2.0 websockets==17.4
    mkdir -p .whl/r1 .whl/r2 .devrun/ray
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $PLATFORMS -d .devrun/ray ray==2.60.0
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp $PLATFORMS -d .whl/r2 \
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py
    (cd .devrun/ray && split -b 40M ray-2.60.0-*.whl ray.part.)
    mv .devrun/ray/ray.part.aa .whl/r1/ && mv .devrun/ray/ray.part.ab .whl/r2/
    rm -rf .devrun/assets .devrun/media
    cp -r "$SHARED/assets" .devrun/assets
    cp -r "$SHARED/media" .devrun/media
    du -sh .whl/a .whl/b .devrun/assets .devrun/media
    ;;
stage1)
    install_wheels "$ROOT/.whl/a"
    rm -rf /tmp/dvp-assets && cp -r "$ROOT/.devrun/assets" /tmp/dvp-assets
    mkdir -p "$SHARED" && rm -rf "$SHARED/assets" && ln -s /tmp/dvp-assets "$SHARED/assets"
    device_env
    python3 - <<'EOF'
from pathlib import Path
import torch, mediapipe
from tracker import assets
print("face model:", assets.install(Path("/tmp/dvp-assets"), home=Path("/tmp/dvp-home")))
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(),
      "mediapipe", mediapipe.__version__)
EOF
    ;;
stage2)
    install_wheels "$ROOT/.whl/b"
    rm -rf /tmp/dvp-media && cp -r "$ROOT/.devrun/media" /tmp/dvp-media
    mkdir -p "$SHARED" && rm -rf "$SHARED/media" && ln -s /tmp/dvp-media "$SHARED/media"
    device_env
    python3 -c "import av, aiortc; print('av', av.__version__, 'aiortc', aiortc.__version__)"
    ;;
ray1)
    cp "$ROOT/.whl/r1/ray.part.aa" /tmp/ray.part.aa
    ;;
ray2)
    cat /tmp/ray.part.aa "$ROOT/.whl/r2/ray.part.ab" > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl \
        "$ROOT"/.whl/r2/*.whl
    device_env
    python3 -c "import ray, prometheus_client; print('ray', ray.__version__)"
    ;;
env)
    device_env
    set +eu +o pipefail  # sourced: leave the caller's shell as it was (a failing bench
    ;;                   # must not end the rest of the call)
*)
    echo "usage: bash bench/device.sh fetch|stage1|stage2|ray1|ray2, or: source bench/device.sh env" >&2
    exit 2
    ;;
esac
