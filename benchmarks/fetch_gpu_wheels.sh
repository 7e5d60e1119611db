#!/usr/bin/env bash
# Download here, where there is a network, the wheels that benchmarks/run_gpu.sh installs on the GPU
# machines (no network, no diffusers) so that the comparisons with diffusers run there too.
# Usage: bash benchmarks/fetch_gpu_wheels.sh [folder]   (default $WHEELS or .whl; git ignores .whl/)
set -euo pipefail
WHEELS=${1:-${WHEELS:-.whl}}
# The diffusers the tests use here (the test extra installs it), so both machines check one oracle.
diffusers_version=$(python3 -c 'from importlib.metadata import version; print(version("diffusers"))') || {
  echo "no diffusers here: install the test extra first (pip install --no-build-isolation -e \".[test]\")" >&2
  exit 1
}
# The GPU machines' CPython 3.12 on x86_64 Linux (torch 2.11's own wheels there are manylinux_2_28, so
# that glibc is new enough). Wheels only: nothing gets built there.
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)

# diffusers with its whole dependency closure, mostly pure Python (regex, pyyaml, charset-normalizer,
# hf-xet, Pillow and safetensors are compiled): run_gpu.sh installs only what the machine lacks.
python3 -m pip download -q --dest "$WHEELS" "${target[@]}" "diffusers==$diffusers_version"
# numpy is on the GPU machines already (scikit-learn's); its 16 MB would only weigh the carried tree.
rm -f "$WHEELS"/numpy-*.whl
# pytorch-fid is pure Python; without its dependencies: torch and torchvision must be the machine's own.
python3 -m pip download -q --dest "$WHEELS" "${target[@]}" --no-deps pytorch-fid

echo "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS (diffusers $diffusers_version)"
