#!/usr/bin/env bash
# Build mmcv's wheel (with its compiled ops) against the torch of a given Python.
#
#   scripts/build_mmcv.sh key   PYTHON                  # print the build's wheelhouse key
#   scripts/build_mmcv.sh build PYTHON OUT_DIR [SDIST]  # build the wheel into OUT_DIR
#
# The key says what the wheel was compiled for: `cpu`, or `cu<torch's CUDA>-sm<archs>`
# (e.g. `cu130-sm90`, `cu130-sm80_90`), so that a CPU-only mmcv is never handed to a GPU
# machine and the other way round. scripts/setup_env.sh keeps one wheelhouse per key.
#
# CUDA or CPU:
#   FORCE_CUDA=1 / FORCE_CUDA=0   decide explicitly (1 needs a CUDA build of torch and nvcc);
#   unset                         CUDA when torch is a CUDA build, nvcc is on the PATH (or in
#                                 CUDA_HOME) and torch sees a GPU; otherwise CPU only.
# Architectures (CUDA only): TORCH_CUDA_ARCH_LIST if set (e.g. "9.0" or "8.0;9.0"), else the
#   compute capabilities of the visible GPUs. MAX_JOBS: parallel compile jobs (default nproc).
# SDIST: mmcv's source archive; downloaded with pip when not given.
set -euo pipefail

MMCV_VERSION=${MMCV_VERSION:-2.1.0}
mode=${1:?usage: build_mmcv.sh key|build PYTHON [OUT_DIR [SDIST]]}
PY=${2:?usage: build_mmcv.sh key|build PYTHON [OUT_DIR [SDIST]]}

# An absolute path for a path argument, without resolving links: the build runs its Python
# from inside the unpacked sdist, where a relative `.venv/bin/python` does not exist, and a
# venv's python must stay the link it is (resolved, it would lose the venv).
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
case $PY in */*) PY=$(absolute "$PY") ;; esac  # a bare name (python3) is looked up on the PATH

# "<cuda|cpu> <torch CUDA version, e.g. 130, or -> <archs, e.g. 8.0;9.0, or ->"
detect() {
  FORCE_CUDA=${FORCE_CUDA:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} "$PY" - <<'EOF'
import os, shutil, sys
import torch
force = os.environ.get('FORCE_CUDA', '')
cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH') or ''
nvcc = shutil.which('nvcc') or (cuda_home and shutil.which('nvcc', path=os.path.join(cuda_home, 'bin')))
if force == '1':
    if not torch.version.cuda or not nvcc:
        sys.exit(f'FORCE_CUDA=1 needs a CUDA build of torch (this one: {torch.__version__}) and nvcc '
                 f'(found: {nvcc or "none"})')
    use = True
elif force in ('', None):
    use = bool(torch.version.cuda and nvcc and torch.cuda.is_available())
else:
    use = False
if not use:
    print('cpu - -')
    sys.exit()
archs = os.environ.get('TORCH_CUDA_ARCH_LIST', '').replace(' ', ';').replace(',', ';')
archs = [a for a in archs.split(';') if a]
if not archs and torch.cuda.is_available():
    archs = sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
if not archs:
    sys.exit('a CUDA build of mmcv needs TORCH_CUDA_ARCH_LIST (e.g. "9.0") when no GPU is visible')
print('cuda', torch.version.cuda.replace('.', ''), ';'.join(archs))
EOF
}

# cheap answers first (no torch import): no nvcc, or no NVIDIA device and no FORCE_CUDA=1
have_nvcc() { command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-${CUDA_PATH:-/nonexistent}}/bin/nvcc" ]; }
have_gpu() { ls /dev/nvidia[0-9]* >/dev/null 2>&1 || nvidia-smi -L >/dev/null 2>&1; }
if [ "${FORCE_CUDA:-}" = 0 ] || { [ -z "${FORCE_CUDA:-}" ] && ! { have_nvcc && have_gpu; }; }; then
  kind=cpu
else
  read -r kind cuda archs < <(detect)
fi
if [ "$kind" = cpu ]; then
  key=cpu
else
  key="cu${cuda}-sm$(echo "$archs" | tr -d '.' | tr ';' '_' | tr -d '+PTX')"
fi
if [ "$mode" = key ]; then
  echo "$key"
  exit 0
fi
[ "$mode" = build ] || { echo "unknown mode $mode (key|build)" >&2; exit 2; }

OUT=$(absolute "${3:?usage: build_mmcv.sh build PYTHON OUT_DIR [SDIST]}")
SDIST=${4:+$(absolute "$4")}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
if [ -z "$SDIST" ]; then
  "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==${MMCV_VERSION}" -d "$build"
  SDIST="$build/mmcv-${MMCV_VERSION}.tar.gz"
fi
tar -xzf "$SDIST" -C "$build"
# torch >= 2.10 headers need C++20; mmcv's setup.py hard-codes older standards (C++ and nvcc).
sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$build/mmcv-${MMCV_VERSION}/setup.py"
mkdir -p "$OUT"
if [ "$kind" = cpu ]; then
  export FORCE_CUDA=0
else
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs"
fi
echo "[build_mmcv] mmcv ${MMCV_VERSION}, key ${key}, FORCE_CUDA=${FORCE_CUDA}" \
     "${TORCH_CUDA_ARCH_LIST:+TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS:-$(nproc)}"
start=$(date +%s)
(cd "$build/mmcv-${MMCV_VERSION}" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$build/out" .)
mv "$build"/out/mmcv-*.whl "$OUT"/
echo "[build_mmcv] built $(ls "$OUT"/mmcv-${MMCV_VERSION}-*.whl) in $(( $(date +%s) - start )) s"
