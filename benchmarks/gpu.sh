#!/usr/bin/env bash
# The GPU check: one run on one CUDA GPU (under 8 minutes, measured on no GPU yet) that prints
#   1. extraction frames/s against the bare CLIP forward, ViT-B/32 size, --workers 1, 4 and 8
#      (benchmarks/extract.py: where decoding, not CLIP, becomes the bound);
#   2. one training epoch of UCFCrime-AR's size in bf16 autocast against fp32: ms per step and how
#      far apart their losses are (benchmarks/train.py);
#   3. one epoch under torchrun as a process group of one on NCCL (benchmarks/gpu_ddp.py);
#   4. varcmp-eval at 290 x 290 and 2,000 x 2,000 (zero-shot heads, all three levels);
#   5. the index build rate, if this version has varcmp-index.
# Usage, from the repository root: bash benchmarks/gpu.sh [WORK_DIR]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BIN=$(dirname "$PY")

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is False with $PY): this script measures" \
         "GPU speed only; the CPU benchmarks are benchmarks/extract.py, train.py, evaluate.py and search.py" >&2
    exit 2
fi

WORK=${1:-$(mktemp -d -t varcmp-gpu-XXXXXX)}
mkdir -p "$WORK"
START=$(date +%s)
section() { echo; echo "== $1 ($(( $(date +%s) - START )) s in)"; }
timed() {  # timed LOG CMD...: CMD with its output in LOG; prints the seconds it took; CMD's exit code
    local log=$1 t0 rc=0
    shift
    t0=$(date +%s.%N)
    "$@" > "$log" 2>&1 || rc=$?
    "$PY" -c "import time; print(f'{time.time() - $t0:.1f}')"
    return $rc
}

section "device"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}')"
nproc

section "1. extraction, ViT-B/32 on cuda: pipeline frames/s against the bare forward"
for w in 1 4 8; do
    echo "-- --workers $w"
    "$PY" benchmarks/extract.py --device cuda --workers "$w" --videos 32 --seconds 20 --work "$WORK/extract" \
        | grep -E "device|bare|pipeline" || echo "FAILED (--workers $w)"
done

section "2. training, one epoch of 1,610 videos: bf16 autocast against fp32"
"$PY" benchmarks/train.py --device cuda --precision fp32,bf16 --keep "$WORK/train.zarr" \
    | grep -E "^cache|precision|ms/step|one epoch|loss agreement" || echo "FAILED"

section "3. torchrun, one process on NCCL: one epoch"
if s=$(timed "$WORK/ddp.log" "$BIN/torchrun" --standalone --nproc-per-node 1 benchmarks/gpu_ddp.py nccl \
        "$WORK/train.zarr" --out "$WORK/ddp" --epochs 1 --device cuda --overwrite); then
    "$PY" -c "import json; h = json.load(open('$WORK/ddp/history.json')); e = h['epochs'][-1]; r = h['runtime']; print(f\"{r['world_size']} process, {r['precision']}, ranks compared: {e['ranks']['world_size']}; {e['steps']} steps at {1000 * e['seconds'] / e['steps']:.0f} ms/step, loss {e['loss']:.5f}; whole command $s s\")"
    grep -o "1 process[^;]*(nccl)[^;]*" "$WORK/ddp.log" | head -1 || echo "(the log does not name NCCL: see $WORK/ddp.log)"
else
    echo "FAILED: see $WORK/ddp.log"; tail -5 "$WORK/ddp.log"
fi

section "4. evaluation on cuda, zero-shot heads, all three levels"
for n in 290 2000; do
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from train import write_cache; from varcmp.cache_schema import CacheSpec; p = Path('$WORK/eval$n.zarr'); p.exists() or write_cache(p, $n, CacheSpec(num_frames=32, num_patches=49, dim=512, max_words=32))"
    if s=$(timed "$WORK/eval$n.log" "$BIN/varcmp-eval" "$WORK/eval$n.zarr" --zero-shot --split train --device cuda); then
        echo "$n x $n: $s s, the whole varcmp-eval command (reading the cache, scoring, 1,000 bootstrap resamples)"
    else
        echo "FAILED: see $WORK/eval$n.log"
    fi
done

section "5. index build"
if command -v "$BIN/varcmp-index" > /dev/null 2>&1; then
    "$BIN/varcmp-train" "$WORK/eval2000.zarr" --out "$WORK/run2000" --epochs 1 --device cuda --overwrite > /dev/null 2>&1 \
        || echo "FAILED to train a checkpoint for the index"
    if s=$(timed "$WORK/index.log" "$BIN/varcmp-index" "$WORK/eval2000.zarr" --checkpoint "$WORK/run2000" \
            --split train --device cuda); then
        echo "2,000 videos indexed in $s s"
    else
        echo "FAILED: see $WORK/index.log (varcmp-index's options may differ from this script's guess)"
    fi
else
    echo "no varcmp-index in this version: skipped"
fi

section "done"
echo "work files kept in $WORK"
