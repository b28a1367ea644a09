#!/usr/bin/env bash
# Everything lowbit checks and measures on a lent GPU, in one call of at most SECONDS (default 540).
#
#   here:   mkdir -p data && xz -T2 -6 -c ../shared/data/cifar10-jpeg.zip > data/cifar10-jpeg.zip.xz
#   there:  LOWBIT_GIT_COMMIT=<commit> bash benchmarks/gpu/session.sh 540      # carrying data/
#   here:   python benchmarks/cifar10/claims.py --budget gpu --unpack <files>/runs.tar.gz --report-only
#
# The zip stores its 60,000 JPEGs uncompressed and their headers repeat, so xz over the whole zip
# gives 19 MB: it travels in one call beside the source tree (the 63 MB zip does not fit the 64 MiB).
# A copy of the tree has no .git: LOWBIT_GIT_COMMIT names the commit in every results file.
# SMOKE=1 runs the same steps on the CPU with tiny sizes, to check this script.
#
# Steps (output in $OUT/session.log; each step is bounded, a failed step does not stop the next):
#   0. pydantic from carried wheels (.whl/) if the machine lacks it; the zip decompressed, md5 checked
#   1. bench_gpu.py: the CUDA test subset, ResNet-20 epoch times (float/QAT, fp32/bf16, batch
#      128-512), 1/4/8 runs sharing the GPU, torch.compile            -> $OUT/gpu.{json,md}
#   2. `lowbit train --device cuda` and `torchrun -m lowbit train` (one process: one GPU)
#                                                                     -> $OUT/cli_*.json
#   3. the claims campaign's GPU budget (paper schedules), float runs first, stopped and archived
#      before the call's end: they resume in the next session         -> $OUT/runs.tar.gz
set -u
budget=${1:-540}
t0=$(date +%s)
left() { echo $((budget - ($(date +%s) - t0))); }
OUT=${OUT:-/tmp/lowbit-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LOWBIT_CACHE=/tmp/lowbit-cache
PY=${PYTHON:-python3}
smoke=${SMOKE:-0}
dev=cuda
[ "$smoke" = 1 ] && dev=cpu
step() { echo "== $(date +%T) [$(( $(date +%s) - t0 )) s] $*"; }

step "0. environment"
if ! $PY -c "import pydantic" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY -c "import numba" 2>/dev/null || { echo "numba does not import: LOWBIT_NUMBA=0"; export LOWBIT_NUMBA=0; }
nvidia-smi -L 2>/dev/null
$PY - <<'EOF' || { echo "lowbit or the device is not usable: stopping"; exit 2; }
import os, torch, lowbit
from lowbit.provenance import git_state, machine, versions
print(versions(), machine(), git_state(), sep="\n")
assert os.environ.get("SMOKE") == "1" or torch.cuda.is_available(), "no CUDA device"
EOF
if [ ! -f data/cifar10-jpeg.zip ]; then
    $PY - <<'EOF' || { echo "no usable CIFAR-10 zip: stopping"; exit 2; }
import hashlib, lzma, os, shutil
src, dst = "data/cifar10-jpeg.zip.xz", "data/cifar10-jpeg.zip"
with lzma.open(src) as f, open(dst + ".part", "wb") as g:
    shutil.copyfileobj(f, g, 1 << 20)
with open(dst + ".part", "rb") as f:
    md5 = hashlib.md5(f.read()).hexdigest()
assert md5 == "c80938593566fd307865585ff1d84959", f"{dst}: md5 {md5}, not the shipped zip's"
os.replace(dst + ".part", dst)
print(f"{dst}: md5 {md5} (the shipped zip)")
EOF
fi

step "1. bench_gpu.py"
if [ "$smoke" = 1 ]; then
    timeout 300 $PY benchmarks/gpu/bench_gpu.py --smoke --out "$OUT"
else
    timeout $(( $(left) - 150 )) $PY benchmarks/gpu/bench_gpu.py --data data/cifar10-jpeg.zip --out "$OUT" \
        --budget-s $(( $(left) - 260 )) --concurrent 1 4 8 --compile
fi

step "2. lowbit train on the device, plain and under torchrun"
cli=(--model resnet20 --data cifar10 --data-dir data --epochs 2 --device "$dev" --precision bf16
     --channels-last --seed 0)
[ "$smoke" = 1 ] && cli+=(--subset 512 --val-size 128 --epochs 1)
timeout 90 $PY -m lowbit train "${cli[@]}" --out /tmp/cli-plain && cp /tmp/cli-plain/result.json "$OUT/cli_plain.json"
timeout 90 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m lowbit train "${cli[@]}" \
    --out /tmp/cli-torchrun && cp /tmp/cli-torchrun/result.json "$OUT/cli_torchrun.json"

step "3. claims campaign, GPU budget ($(left) s left)"
claims=(--budget gpu --data-dir data --device "$dev" --out /tmp/claims-report --archive "$OUT/runs.tar.gz"
        --archive-slim)
[ "$smoke" = 1 ] && claims=(--budget smoke --data-dir data --only float multipoint --out /tmp/claims-report
                            --archive "$OUT/runs.tar.gz" --archive-slim)
[ -f runs-in.tar.gz ] && claims+=(--unpack runs-in.tar.gz)
stop=$(( $(left) - 45 ))
if [ "$stop" -gt 30 ]; then
    timeout $(( stop + 40 )) $PY benchmarks/cifar10/claims.py "${claims[@]}" --stop-after "$stop" | tail -40
fi
step "done"
ls -l "$OUT"
