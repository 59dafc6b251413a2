#!/usr/bin/env bash
# On the lent GPU machine (repository root, .gpu carried; see benchmarks/gpu_prepare.sh): install the
# carried wheels, unpack the data, check the imports, run benchmarks/gpu.py. Results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD/src"
mkdir -p /tmp/gpu-data && gunzip -c .gpu/data/cifar10-jpeg.zip.gz > /tmp/gpu-data/cifar10-jpeg.zip && cp .gpu/data/*.th /tmp/gpu-data/ || exit 4
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, prunepilot.compression, prunepilot.agents.pipeline; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 5
python3 benchmarks/gpu.py --data /tmp/gpu-data --budget-s "${GPU_BUDGET_S:-450}" --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
