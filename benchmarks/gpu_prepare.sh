#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for benchmarks/gpu_run.sh on a lent GPU machine, which reaches no
# network and receives only this repository (../shared/data does not travel): the data, compressed
# (the zip's JPEG headers repeat: 61 MB -> about 20 MB), and the wheels of the packages the
# machine's image lacks (Python 3.12 there; torch, torchvision, numpy, scipy, onnx, Pillow and
# safetensors are in the image). Versions as constraints.txt pins them.
#
#   bash benchmarks/gpu_prepare.sh [SHARED_DATA_DIR]       # default ../shared/data
#   then, with the device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/data}"
rm -rf .gpu && mkdir -p .gpu/data .gpu/wheels
gzip -6 -c "$src/cifar10-jpeg.zip" > .gpu/data/cifar10-jpeg.zip.gz
cp "$src/resnet56-cifar10.th" "$src/resnet20-cifar10.th" .gpu/data/
pin() { grep -i "^$1==" constraints.txt | head -1; }
pkgs=(torch-pruning pydantic pydantic_core annotated-types typing-inspection optuna alembic SQLAlchemy Mako greenlet colorlog
      gymnasium Farama-Notifications stable_baselines3)
specs=()
for p in "${pkgs[@]}"; do s=$(pin "$p"); [ -n "$s" ] || { echo "not pinned in constraints.txt: $p"; exit 1; }; specs+=("$s"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .gpu/wheels "${specs[@]}"
du -sh .gpu .gpu/data .gpu/wheels
echo "carry .gpu (the repository and .gpu must stay under 64 MiB together)"
