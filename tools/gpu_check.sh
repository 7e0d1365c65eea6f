#!/usr/bin/env bash
# The GPU check of dcn_plugin's Triton kernels, in one command, within 8 minutes:
#
#   bash tools/gpu_check.sh [OUTDIR]        # OUTDIR defaults to gpu-check-<date>
#
# For a GPU machine (H100/H200, torch with CUDA, no package index): installs what is missing from
# wheels in .whl/ (pip --no-index --no-deps; never torch), builds the CPU extension in place
# against the torch there, runs the op tests on CUDA, and benchmarks the GPU cases with
# tools/benchmark.py --device cuda in float32 and in bfloat16 autocast (dcn_plugin, cuDNN
# convolution, torchvision.ops.deform_conv2d where installed: forward, forward+backward, peak
# memory), and last the RoI pooling ops' CUDA tests and benchmark (--op roi). Before the GPU steps
# it runs the compile matrix's row for the Triton installed there (tools/triton_compile_matrix.py
# --installed: every launch variant for sm_80/90/100 and gfx90a/gfx942, compile-matrix.md/.json)
# and records that Triton's version in summary.txt. Everything goes to OUTDIR: env.txt, *.log,
# pytest's junit XML, the benchmark tables (Markdown and JSON), and summary.txt with each step's status.
#
# Without a GPU it builds, checks that the kernels compile (the matrix row, and the tests' sm_90 and
# gfx942 compilations) and that the commands below are well-formed, says which GPU steps it skipped,
# and exits 0 when all of that passed. Each step has a timeout taken from one overall deadline, so
# the whole check ends within the budget even when a step hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
: > "$OUT/summary.txt"

say() { echo "gpu_check: $*" | tee -a "$OUT/summary.txt"; }

# step NAME CAP_S COMMAND...: runs COMMAND with a timeout of CAP_S seconds or what is left of the
# budget, whichever is less; logs to OUTDIR/NAME.log; records its status.
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    say "$name: SKIPPED (out of time: ${left}s of the ${BUDGET_S}s budget left)"
    return 1
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    say "$name: ok (${took}s)"
  elif (( rc == 124 || rc == 137 )); then
    say "$name: TIMED OUT after ${took}s (limit ${limit}s); see $name.log"
  else
    say "$name: FAILED (exit $rc, ${took}s); see $name.log"
  fi
  # the summary line of pytest, or the last lines of anything else
  { grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)" "$OUT/$name.log" || tail -n 3 "$OUT/$name.log"; } \
    | tail -n 3 | sed 's/^/    /'
  return $rc
}

# Missing Python packages, from .whl/ only: module:distribution pairs (pytest's and hypothesis's
# own dependencies included, since --no-deps installs nothing else). torch is never installed.
install_missing() {
  local pairs="pytest:pytest iniconfig:iniconfig pluggy:pluggy packaging:packaging hypothesis:hypothesis
               attr:attrs sortedcontainers:sortedcontainers numpy:numpy ninja:ninja triton:triton
               torchvision:torchvision"
  local missing=()
  for pair in $pairs; do
    python -c "import ${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
  done
  if (( ${#missing[@]} == 0 )); then
    echo "nothing missing"; return 0
  fi
  echo "missing: ${missing[*]}"
  if [[ ! -d .whl ]]; then
    echo "no .whl/ folder: cannot install ${missing[*]} without a package index"; return 0
  fi
  for dist in "${missing[@]}"; do
    python -m pip install --no-index --no-deps --find-links .whl "$dist" \
      || echo "not installed: $dist (no wheel for it in .whl/)"
  done
}

environment() {
  date -Iseconds
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null
  python - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| HIP", torch.version.hip, "| cuDNN", torch.backends.cudnn.version())
for name in ("triton", "torchvision"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}")
else:
    print("no CUDA device")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi
  return 0
}

export -f environment install_missing
STATUS=0
say "writing to $OUT (budget ${BUDGET_S}s)"
step env 30 bash -c environment || STATUS=1
step install 60 bash -c install_missing || STATUS=1
step build 120 env MAX_JOBS="$(nproc)" python setup.py build_ext --inplace || {
  say "the build failed: nothing else can run"; exit 1; }

# The compile matrix's row for this machine's Triton (the one its torch pins): every launch variant
# for every target, on all cores (about 30 s on 16), before the GPU steps so that it always runs.
say "triton here: $(python -c 'import triton; print(triton.__version__)' 2>&1 | tail -n 1)"
step compile-matrix 60 python tools/triton_compile_matrix.py --installed --jobs "$(nproc)" \
  --markdown "$OUT/compile-matrix.md" --json "$OUT/compile-matrix.json" || STATUS=1

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
else
  GPU=0
  say "no CUDA device here: skipping the tests on CUDA and the CUDA benchmarks (a dry run)"
fi

PYTEST=(python -m pytest -rfEs -p no:cacheprovider)
if (( GPU )); then
  # The Triton tests and the device comparisons first, then every other op test's CUDA parameters.
  step tests-triton 150 "${PYTEST[@]}" -m cuda --junitxml="$OUT/tests-triton.xml" \
    tests/test_ops_triton.py tests/test_ops_cuda.py || STATUS=1
  step tests-ops 100 "${PYTEST[@]}" -m cuda --junitxml="$OUT/tests-ops.xml" \
    tests/test_ops_reference.py tests/test_ops_properties.py tests/test_ops_errors.py \
    tests/test_ops_compile.py tests/test_ops_gradcheck.py tests/test_modules.py || STATUS=1
  BENCH=(python tools/benchmark.py --device cuda --repeats 5 --min-time 0.3)
  step bench-float32 60 "${BENCH[@]}" --markdown "$OUT/bench-cuda-float32.md" \
    --json "$OUT/bench-cuda-float32.json" || STATUS=1
  step bench-bfloat16-autocast 60 "${BENCH[@]}" --dtype bfloat16 --autocast \
    --markdown "$OUT/bench-cuda-bfloat16-autocast.md" --json "$OUT/bench-cuda-bfloat16-autocast.json" || STATUS=1
  # The RoI pooling ops last, so that they never take time from the convolution's steps.
  step tests-roi 60 "${PYTEST[@]}" -m cuda --junitxml="$OUT/tests-roi.xml" \
    tests/test_roi_pool_triton.py tests/test_roi_pool.py || STATUS=1
  step bench-roi 40 "${BENCH[@]}" --op roi --markdown "$OUT/bench-cuda-roi-float32.md" \
    --json "$OUT/bench-cuda-roi-float32.json" || STATUS=1
else
  # What runs without a GPU: the kernels compile for sm_90 and gfx942, and the commands above are well-formed.
  step compile-kernels 120 "${PYTEST[@]}" tests/test_ops_triton.py tests/test_roi_pool_triton.py \
    -k "compile_for_a_gpu or registered" || STATUS=1
  step tests-collect 60 "${PYTEST[@]}" -m cuda --collect-only tests/test_ops_triton.py tests/test_ops_cuda.py \
    tests/test_roi_pool_triton.py tests/test_roi_pool.py || STATUS=1
  step bench-list 30 python tools/benchmark.py --list || STATUS=1
  step bench-list-roi 30 python tools/benchmark.py --op roi --list || STATUS=1
fi
say "done in $(( $(date +%s) - START ))s; status $STATUS (0: every step passed)"
exit $STATUS
