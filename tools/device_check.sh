#!/usr/bin/env bash
# The GPU checks, in one command on a machine with a CUDA device and PyTorch but without the
# packages zarr needs (the device machine's image): the GPU tests, then the 7B load benchmark.
#
#   tools/device_check.sh fetch     # here: wheels of what that image lacks, into .whl/ (ignored by git)
#   tools/device_check.sh run       # there, with .whl/ beside the checkout; PARAMS=3e9 for a shorter run
#
# Results go to $OUT (or ./device-out): tests.log, bench_gpu.json, bench_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0"
case "${1:-}" in
fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    ls .whl ;;
run)
    out=${OUT:-$PWD/device-out}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python3 -m pytest -q -p no:cacheprovider tests/serving/test_gpu.py tests/fidelity/test_gpu_calibration.py 2>&1 | tee "$out/tests.log" || true
    python3 -m tools.bench_gpu --params "${PARAMS:-7e9}" --dir /tmp/bench-gpu --json \
        > "$out/bench_gpu.json" 2> "$out/bench_gpu.log" || { tail -20 "$out/bench_gpu.log"; exit 1; }
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({k: r[k] for k in ('params', 'write_s', 'store_s', 'ratios', 'check')}, indent=1))" "$out/bench_gpu.json" ;;
*)
    echo "usage: tools/device_check.sh fetch|run" >&2; exit 2 ;;
esac
