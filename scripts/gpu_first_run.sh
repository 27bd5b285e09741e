#!/usr/bin/env bash
# The first run of torchnova on a GPU machine, in one call: build, test, sanitize, benchmark.
#
#   bash scripts/gpu_first_run.sh                 # on the GPU machine (no network needed)
#   OUT=/some/dir bash scripts/gpu_first_run.sh   # results there instead of benchmarks/results/<gpu>/first-run
#   bash scripts/gpu_first_run.sh --dry-run       # what it would do; automatic when no GPU is visible
#
# Assumes: a system Python (PYTHON, default python3) with torch >= 2.11 (a CUDA build) and triton >= 3.6 already
# installed, nvcc (CUDA_HOME, default /usr/local/cuda), no network. Creates no virtual environment and installs
# nothing into that Python: pytest/hypothesis, when missing, come from a wheels/ folder (git-ignored) prepared on
# a machine with network with the `pip download` line this script prints; they go to build/first-run-site.
#
# Steps, most valuable first, each under its own timeout, all within a total budget (--budget, default 450 s, so
# the whole fits in 8 minutes on an H100/H200 with 16 cores). Every log and result goes under one folder, each
# step's files written as the step runs; summary.txt gets one line per step (ok / FAIL / TIMEOUT / SKIPPED, and why).
#   env         versions, GPU, what is importable                          env.txt
#   build       the extension for the visible GPU's arch only, all cores   build.log
#   check_st, check_dc   the CUDA kernels' self-checks against float64 (scripts/gpu_check_*.py --quick)
#                                                                          gpu_check_spacetime.log, ..._dual_channel.log
#   pytest      the whole test suite on the GPU (bf16 included)            pytest.log, pytest-junit.xml
#   memcheck, racecheck, synccheck   compute-sanitizer on one small launch of every CUDA kernel
#               (scripts/gpu_sanitize_cases.py)                            sanitize-<tool>.log
#   benchmarks  python -m benchmarks --quick                               benchmarks/, benchmarks.log
# Exit status: 0 when every step that ran passed (or in a dry run), 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
BUDGET_S=450
DRY_RUN=0
OUT_DIR=${OUT:-}
PYTEST_VERSION=9.2.0          # pinned as in scripts/setup.sh
HYPOTHESIS_VERSION=6.170.15
NINJA_VERSION=1.13.2

usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR=${2:?gpu_first_run.sh: --out needs a folder}; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --budget) BUDGET_S=${2:-}; shift ;;
    --budget=*) BUDGET_S=${1#--budget=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_first_run.sh: unknown argument '$1' (expected --dry-run, --out DIR, --budget SECONDS, --help)" >&2
       exit 2 ;;
  esac
  shift
done
case "$BUDGET_S" in ''|*[!0-9]*) echo "gpu_first_run.sh: --budget must be a whole number of seconds, got '$BUDGET_S'" >&2; exit 2 ;; esac

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
export PYTHONPATH="$ROOT/pyext${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# One Python start-up for versions, GPU and the GPU's name (importing torch takes seconds).
if ! PY_INFO=$("$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton: not importable ({exc})")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    optin = getattr(p, "shared_memory_per_block_optin", "?")
    print(f"gpu {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"shared memory per block (opt-in) {optin} bytes, capability {p.major}.{p.minor}")
print("gpu_name=" + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""))
EOF
); then
  echo "gpu_first_run.sh: $PY cannot import torch; set PYTHON to the Python that has torch and triton" >&2
  exit 2
fi
GPU_NAME=$(printf '%s\n' "$PY_INFO" | sed -n 's/^gpu_name=//p')
if [ -z "$GPU_NAME" ] && [ "$DRY_RUN" = 0 ]; then
  echo "[first-run] no CUDA GPU visible to $PY: dry run (everything that needs no GPU)"
  DRY_RUN=1
fi
GPU_SLUG=$(printf '%s' "${GPU_NAME:-no-gpu}" | tr -c 'A-Za-z0-9._-' '-' | sed 's/-\{2,\}/-/g; s/-$//')
OUT_DIR=${OUT_DIR:-benchmarks/results/$GPU_SLUG/first-run}
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=0

say() { echo "[first-run] $*"; }
record() {  # step status seconds detail
  printf '%-11s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
  case "$2" in FAIL|TIMEOUT) FAILED=1 ;; esac
}

# run_step NAME TIMEOUT LOG COMMAND...: runs COMMAND under min(TIMEOUT, time left - RESERVE) seconds, output to
# LOG; RESERVE (seconds) is kept for the steps after this one.
RESERVE=0
run_step() {
  local name=$1 want=$2 log=$3
  shift 3
  local now left limit t0 rc
  now=$(date +%s)
  left=$((DEADLINE - now - RESERVE))
  limit=$(( want < left ? want : left ))
  if [ "$DRY_RUN" = 1 ]; then
    printf 'would run (timeout %ss): %s\n' "$want" "$*" > "$log"
    record "$name" DRY 0 "would run (timeout ${want}s): $*"
    return 0
  fi
  if [ "$limit" -lt 10 ]; then
    record "$name" SKIPPED 0 "no time left in the ${BUDGET_S}s budget"
    return 0
  fi
  say "$name (timeout ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    record "$name" ok "$took" "$(tail -n 1 "$log" | cut -c1-150)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" TIMEOUT "$took" "killed after ${limit}s; partial output in $(basename "$log")"
  else
    record "$name" FAIL "$took" "exit $rc; see $(basename "$log"): $(tail -n 1 "$log" | cut -c1-120)"
  fi
}

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ----- env: versions, GPU, importability (also in a dry run) --------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   cores: $(nproc)   dry_run: $DRY_RUN"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
  printf '%s\n' "$PY_INFO" | grep -v '^gpu_name='
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
  echo "nvcc: $( (${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version 2>/dev/null || nvcc --version 2>/dev/null) | tail -n 1)"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# ----- test tools: pytest / hypothesis from wheels/ when the system Python lacks them -------------------------
SITE="$ROOT/build/first-run-site"
if [ -d "$ROOT/wheels" ] && { ! has_module pytest || ! has_module hypothesis || ! has_module ninja; }; then
  if [ "$DRY_RUN" = 1 ]; then
    say "would install from wheels/: $PY -m pip install --no-index --find-links wheels --target $SITE pytest hypothesis ninja"
  else
    "$PY" -m pip install --quiet --no-index --find-links "$ROOT/wheels" --target "$SITE" pytest hypothesis ninja \
      > "$OUT_DIR/wheels.log" 2>&1 || say "installing from wheels/ failed (see wheels.log)"
  fi
fi
[ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE" && export PATH="$SITE/bin:$PATH"
MISSING=""
for module in pytest hypothesis ninja; do has_module "$module" || MISSING="$MISSING $module"; done
if [ -n "$MISSING" ]; then
  say "not importable:$MISSING. To bring them to a machine without network, run where there is network:"
  say "  $PY -m pip download --dest wheels --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 pytest==$PYTEST_VERSION hypothesis==$HYPOTHESIS_VERSION ninja==$NINJA_VERSION"
  say "  and copy wheels/ into the checkout (git ignores it); this script installs from it with --no-index."
fi
if ! has_module ninja && ! command -v ninja >/dev/null; then
  say "ninja is missing: the build compiles one file at a time (slower; the build step may time out)"
fi

# ----- build: this GPU's arch only, all cores --------------------------------------------------------------
CORES=$(nproc)
if [ -n "$GPU_NAME" ]; then
  ARCH=$(printf '%s\n' "$PY_INFO" | sed -n 's/^gpu 0: .*capability \([0-9]*\.[0-9]*\)$/\1/p')
  [ -n "$ARCH" ] || ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
else
  ARCH="9.0"  # dry run: what an H100/H200 gets
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
RESERVE=210  # the checks, pytest, sanitizers and benchmarks need at least this much after the build
run_step build 240 "$OUT_DIR/build.log" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$CORES" \
  NVCC_THREADS=1 "$PY" setup.py build_ext --inplace
if [ "$DRY_RUN" = 0 ]; then
  "$PY" -m torchnova.info >> "$OUT_DIR/build.log" 2>&1
  grep -q "CUDA kernels: yes" "$OUT_DIR/build.log" || say "the extension has no CUDA kernels (see build.log): cuda-backend steps will report it"
fi

# ----- the CUDA kernels' own float64 self-checks (seconds) -------------------------------------------------
RESERVE=170
run_step check_st 40 "$OUT_DIR/gpu_check_spacetime.log" "$PY" scripts/gpu_check_spacetime.py --quick
run_step check_dc 40 "$OUT_DIR/gpu_check_dual_channel.log" "$PY" scripts/gpu_check_dual_channel.py --quick

# ----- the whole test suite on the GPU ---------------------------------------------------------------------
RESERVE=120
if has_module pytest; then
  PYTEST_ARGS=(tests -v -p no:cacheprovider -rfEs --durations=25 --junitxml="$OUT_DIR/pytest-junit.xml")
  if ! has_module hypothesis; then
    PYTEST_ARGS+=(--ignore-glob='tests/test_properties*')
    say "hypothesis is not importable: the property-based tests (tests/test_properties*) are left out"
  fi
  run_step pytest 200 "$OUT_DIR/pytest.log" "$PY" -m pytest "${PYTEST_ARGS[@]}"
else
  record pytest SKIPPED 0 "pytest is not importable by $PY (see the pip download line above)"
fi

# ----- compute-sanitizer on one small launch of every CUDA kernel ------------------------------------------
if ! "$PY" scripts/gpu_sanitize_cases.py --list > "$OUT_DIR/sanitize-cases.txt" 2>&1; then
  say "scripts/gpu_sanitize_cases.py --list failed (see sanitize-cases.txt)"
  FAILED=1
fi
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
RESERVE=60
for tool in memcheck racecheck synccheck; do
  if [ ! -x "$SANITIZER" ] && [ "$DRY_RUN" = 0 ]; then
    record "$tool" SKIPPED 0 "compute-sanitizer not found (PATH, $CUDA_HOME/bin)"
    continue
  fi
  # memcheck without the caching allocator, so an overrun past a tensor is outside any allocation.
  NO_CACHE=()
  [ "$tool" = memcheck ] && NO_CACHE=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  run_step "$tool" 45 "$OUT_DIR/sanitize-$tool.log" env ${NO_CACHE[@]+"${NO_CACHE[@]}"} \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 50 "$PY" scripts/gpu_sanitize_cases.py
done

# ----- benchmarks (what is left of the budget) -------------------------------------------------------------
RESERVE=0
run_step benchmarks 150 "$OUT_DIR/benchmarks.log" "$PY" -m benchmarks --quick --out "$OUT_DIR/benchmarks"

say "done in $(( $(date +%s) - START ))s; results in $OUT_DIR (summary.txt):"
cat "$SUMMARY"
[ "$DRY_RUN" = 1 ] && exit 0
exit "$FAILED"
