#!/usr/bin/env bash
# One device-machine session: build the CUDA kernels, run the headline benchmark, the tests and the
# benchmarks, and leave logs and the results JSON under $OUT (default ./gpu_out). Prepared ahead so that a
# short GPU lease is spent measuring, not typing. Usage: DDPM_FAST_COMMIT=<sha> bash benchmarks/run_gpu.sh
# WHEELS (default .whl, made beforehand by benchmarks/fetch_gpu_wheels.sh and carried along) holds
# diffusers and pytorch-fid for the tests and benchmarks that compare with them; without it they skip.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PATH=$PATH:/usr/local/cuda/bin PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
log() { echo "=== $* ($(date +%T))"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

log "build with CUDA kernels (sm_90)"
if ! DDPM_FAST_BUILD_CUDA=1 DDPM_FAST_CUDA_ARCH=90 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  log "CUDA build failed: falling back to CPU kernels + Triton"
  DDPM_FAST_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
fi
grep -h "ddpm_fast: CUDA" "$OUT/build.log"

log "test oracles from ${WHEELS:=.whl}"
if [ -d "$WHEELS" ]; then
  # Offline and resolving against what is installed: only missing or too-old dependencies come from
  # the folder (it holds no torch); torch and numpy stay the machine's own. pytorch-fid without its
  # dependencies: its torchvision would have to be built for this machine's torch.
  python3 -m pip install -q --no-index --find-links "$WHEELS" diffusers >"$OUT/wheels.log" 2>&1 ||
    tail -5 "$OUT/wheels.log"
  python3 -m pip install -q --no-index --find-links "$WHEELS" --no-deps pytorch-fid >>"$OUT/wheels.log" 2>&1 ||
    tail -5 "$OUT/wheels.log"
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/machine.txt"
else
  echo "no $WHEELS folder (benchmarks/fetch_gpu_wheels.sh makes it): skipping the comparisons with diffusers" \
    "(tests, and the diffusers cases of the unet, sampler and train benchmarks) and pytorch-fid's oracle test" |
    tee -a "$OUT/machine.txt"
fi

log "self-check"
python3 -m ddpm_fast check 2>&1 | tee "$OUT/check.txt"

# The headline first (issue 21: <= 8 minutes on one H100/H200 including compilation): the figures
# that matter most if the lease runs out. HEADLINE=0 skips it.
if [ "${HEADLINE:-1}" != 0 ]; then
  log "headline"
  timeout "${HEADLINE_TIMEOUT:-540}" python3 -m ddpm_fast bench --headline --out "$OUT/headline.json" \
    >"$OUT/headline.log" 2>&1
  echo "headline exit code $?"; tail -60 "$OUT/headline.log"
fi

log "tests"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
# -v: one line per test as it ends, so a timeout still leaves the names of the failures.
# TESTS picks files (e.g. the ops an issue is about first), default the whole suite.
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest ${TESTS:-tests/} -v -rfE $xdist -p no:cacheprovider >"$OUT/tests.log" 2>&1
echo "tests exit code $?"; grep -E " (FAILED|ERROR) |^(FAILED|ERROR) " "$OUT/tests.log" | head -20; tail -3 "$OUT/tests.log"

# One pytest per op family, each writing its own JSON, so a timeout keeps what finished.
# BENCH_FILTER (a pytest -k expression) trims the suite to fit a short lease; FAMILIES (e.g.
# "groupnorm attention") picks the files, default every benchmarks/test_bench_*.py.
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
default_families=$(ls benchmarks/test_bench_*.py | sed 's|.*/test_bench_||; s|\.py$||' | tr '\n' ' ')
for family in ${FAMILIES:-$default_families}; do
  log "benchmarks: $family"
  timeout "${BENCH_TIMEOUT:-240}" python3 -m pytest "benchmarks/test_bench_$family.py" --benchmark-only -q \
    -p no:cacheprovider ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-json="$OUT/gpu-$family.json" \
    >"$OUT/bench-$family.log" 2>&1
  echo "bench $family exit code $?"; tail -45 "$OUT/bench-$family.log"
done
log "done"
