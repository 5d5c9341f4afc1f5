#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md as one prepared run, for a lent NVIDIA machine (issue: performance).
#
#   bash bench/gpu_suite.sh --prepare   # here, once: the wheels the GPU machine lacks -> .whl/ (git-ignored)
#   bash bench/gpu_suite.sh             # there, from the repository root (carry .whl):
#                                       # results as JSON (and a log) under $OUT, or ./gpu-results
#   PYTHON=.venv/bin/python DEVICE=cpu N=4 NV=4 bash bench/gpu_suite.sh   # a rehearsal on a CPU, small sizes
#
# What it measures, in this order (about 6-8 minutes on one H100/H200-class GPU):
#   1. standardize per 512² slice with the shipped default model at batch 16 and 64: s/slice,
#      FLOPs, fraction of the bf16 matmul peak per phase (`sample` is the denoiser), peak GPU memory;
#   2. a 300-slice 512² volume, NRRD in -> NRRD out, per phase, at batch 16 and 64 (target: <= 5 s);
#   3. training throughput per phase (patches/s) for default.json and large.json at their batch sizes;
#   4. the Choe-2019-kind peer CNN at batch 1, 16, 64.
# The GPU machine's own python3 holds PyTorch; LTDiffPP's other needs that it lacks (SimpleITK,
# pydicom) travel as wheels; the benchmarks import nothing else that is missing there (without
# astra-toolbox, bench_training.py makes its small training set by image-space kernel filtering). The device tool
# returns at most 8 files from $OUT: this writes 8 (7 JSON files and the log).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "SimpleITK>=2.3,<3" "pydicom>=2.4,<4"
    # a device call carries at most 64 MiB (67,108,864 bytes): the wheels and the tracked files together
    du -cb .whl/* $(git ls-files) | tail -n 1
    exit 0
fi

OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import SimpleITK, pydicom' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
DEVICE="${DEVICE:-cuda}" N="${N:-128}" NV="${NV:-300}"  # device; slices of the per-slice and the volume runs
! command -v nvidia-smi >/dev/null || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
M=ltdiffpp-b30f-b70f
run() { echo "== $*"; timeout 240 "$@" || echo "!! failed ($?): $*"; }
for b in 16 64; do
    run "$PY" bench/bench_standardize.py --model $M --device $DEVICE --slices $N --batch-size $b --repeat 3 \
        $([[ $b == 16 ]] || echo --no-peak) --json "$OUT/standardize_b$b.json"
done
for b in 16 64; do
    run "$PY" bench/bench_volume.py --model $M --device $DEVICE --slices $NV --batch-size $b --workdir /tmp/bv \
        --json "$OUT/volume_b$b.json"
done
run "$PY" bench/bench_training.py --device $DEVICE --json "$OUT/train_default.json"
run "$PY" bench/bench_training.py --device $DEVICE --config Training/configs/large.json \
    --json "$OUT/train_large.json"
run "$PY" bench/bench_peer_cnn.py --device $DEVICE --slices $N --batch-size 1 16 64 --json "$OUT/peer_cnn.json"
ls -la "$OUT"
