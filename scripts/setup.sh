#!/usr/bin/env bash
# Set up torchnova in a virtual environment (.venv) and build it: idempotent, safe to re-run.
#
#   bash scripts/setup.sh                 # torch 2.14.1 (CUDA 13.0 build; runs on CPU too) + CUDA kernels if nvcc exists
#   TORCHNOVA_TORCH=2.13.0 bash scripts/setup.sh    # small CPU-only torch: builds the CPU kernels only, says why
#
# TORCHNOVA_SKIP_CPP_BUILD=1 installs the Python package only (reference and Triton backends).
# Environment: PYTHON (default python3), TORCHNOVA_VENV (default .venv), TORCHNOVA_TORCH (default 2.14.1),
# FORCE_CUDA (default: 1 when nvcc and a CUDA build of torch are present), TORCH_CUDA_ARCH_LIST (default: the
# visible GPU's arch, else "8.0;9.0"), MAX_JOBS (default 2), NVCC_THREADS, CUDA_HOME (default /usr/local/cuda),
# TORCHNOVA_CUDA_EMULATION (default 1: also build the test-only CUDA emulation layer torchnova._C_cuda_emu, which
# runs the CUDA kernels on CPU tensors in the tests; g++ only, about 3 min of CPU on top of the build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${TORCHNOVA_VENV:-.venv}
TORCH_VERSION=${TORCHNOVA_TORCH:-2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Pinned: what CI and the benchmarks were run with. scikit-learn only for the examples' offline datasets;
# codecarbon is the optional torchnova[carbon] (grid intensity by country / cloud region; it pulls no torch);
# hypothesis for the property-based tests (tests/test_properties_*.py). cuobjdump and nvdisasm (binaries only, about
# 6 MB; the CUDA toolkit here ships neither) for scripts/cuda_build_report.py: -res-usage of the built .so and the
# HMMA check in -sass; 13.2.51 reads nvcc 13.0's sm_80/sm_90/sm_120 cubins.
"$PY" -m pip install -q --disable-pip-version-check \
  "torch==${TORCH_VERSION}" "numpy==2.4.6" "pytest==9.2.0" "ninja==1.13.2" "pybind11==3.1.0" \
  "setuptools==84.2.1" "wheel==0.48.0" "tqdm==4.70.1" "hypothesis==6.170.15" "matplotlib==3.11.2" \
  "scikit-learn==1.9.1" "codecarbon==3.3.2" "nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-nvdisasm==13.2.51" \
  2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch" # fail here, clearly, if the install did not work
# torchnova.integrations' libraries (diffusers; timm for the MESA parity test), so CI runs those tests. Pure Python;
# torch is pinned on the same line so pip never swaps it. timm needs torchvision, whose build must match torch: 0.29.1
# goes with 2.14.1, so timm is skipped (and its test with it) for another TORCHNOVA_TORCH.
INTEGRATIONS=("diffusers==0.42.1")
if [ "$TORCH_VERSION" = "2.14.1" ]; then INTEGRATIONS+=("timm==1.0.31" "torchvision==0.29.1"); fi
"$PY" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}" "${INTEGRATIONS[@]}" 2>&1 \
  | grep -v "^WARNING: Location" || true
# torchnova.integrations' model libraries, pinned (their tests compare against them; without them they skip).
# --no-deps: video-diffusion-pytorch also lists transformers/sentencepiece (BERT text conditioning, unused here),
# and nothing may replace the pinned torch; torchvision must be the build made for this torch.
case "$TORCH_VERSION" in
  2.14.*) TORCHVISION_VERSION=0.29.1 ;;
  2.13.*) TORCHVISION_VERSION=0.28.0 ;;
  *) TORCHVISION_VERSION= ;;
esac
if [ -n "$TORCHVISION_VERSION" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "torchvision==${TORCHVISION_VERSION}" \
    "video-diffusion-pytorch==0.7.0" "einops==0.8.2" "einops-exts==0.0.4" "rotary-embedding-torch==0.9.1" \
    2>&1 | grep -v "^WARNING: Location" || true
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
TORCH_HAS_CUDA=$("$PY" -c "import torch; print(int(torch.version.cuda is not None))")
GPU_VISIBLE=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ -z "${FORCE_CUDA:-}" ]; then
  if [ "$TORCH_HAS_CUDA" = 1 ] && [ -n "${CUDA_HOME:-}" ] && [ -x "${CUDA_HOME}/bin/nvcc" ]; then
    export FORCE_CUDA=1
  else
    export FORCE_CUDA=0
  fi
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  if [ "$GPU_VISIBLE" = 1 ]; then  # build for this GPU only: the fastest build that runs here
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  else
    TORCH_CUDA_ARCH_LIST="8.0;9.0"
  fi
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-2}
export TORCHNOVA_CUDA_EMULATION=${TORCHNOVA_CUDA_EMULATION:-1}

echo "[setup] torch ${TORCH_VERSION}, FORCE_CUDA=${FORCE_CUDA}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}, MAX_JOBS=${MAX_JOBS}, TORCHNOVA_CUDA_EMULATION=${TORCHNOVA_CUDA_EMULATION}"
# Rebuild only when the sources or the build settings changed since the last successful build.
STAMP="$VENV/.torchnova-build-stamp"
# tests/test_build.py fails when this marker exists and torchnova._C does not import (a build that "worked" but
# cannot load would otherwise turn every cpp test into a skip).
EXPECT_CPP="$VENV/.torchnova-expect-cpp"
SKIP_CPP=${TORCHNOVA_SKIP_CPP_BUILD:-0}
SKIP_TAG=""  # empty for a normal build, so existing stamps stay valid
if [ "$SKIP_CPP" = 1 ]; then SKIP_TAG=" skip-cpp"; fi
WANT=$( (cat setup.py $(find csrc -type f | sort); echo "$TORCH_VERSION $FORCE_CUDA ${TORCH_CUDA_ARCH_LIST:-} ${DEBUG:-0} $TORCHNOVA_CUDA_EMULATION$SKIP_TAG") | sha256sum | cut -d' ' -f1)
EMU_IMPORT="import torchnova._C"
[ "$TORCHNOVA_CUDA_EMULATION" = 1 ] && EMU_IMPORT="import torchnova._C, torchnova._C_cuda_emu"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && { [ "$SKIP_CPP" = 1 ] || "$PY" -c "$EMU_IMPORT" 2>/dev/null; }; then
  echo "[setup] extension up to date"
  exit 0
fi
rm -f "$EXPECT_CPP"
LOG=$(mktemp /tmp/torchnova-build.XXXXXX.log)
if ! "$PY" -m pip install -v --no-build-isolation --no-deps --disable-pip-version-check -e . >"$LOG" 2>&1; then
  tail -n 60 "$LOG"
  echo "[setup] build FAILED (full log: $LOG)"
  exit 1
fi
grep "\[torchnova setup\]" "$LOG" || true
if [ "$SKIP_CPP" != 1 ]; then
  echo "built by scripts/setup.sh: torchnova._C must import" > "$EXPECT_CPP"
fi
echo "$WANT" > "$STAMP"
"$PY" -m torchnova.info
