#!/usr/bin/env bash
# Create or refresh the project virtual environment (.venv).
#
# Re-runs only when the requirement files, these scripts or the mmcv build key changed (a
# stamp in .venv records their hash). mmcv 2.1.0 has no wheel for our torch, so it is
# compiled once from its sdist (scripts/build_mmcv.sh) and kept in a wheelhouse keyed by the
# torch version, the Python and the build: `cpu`, or `cu<CUDA>-sm<archs>` with its CUDA ops
# when torch is a CUDA build, nvcc is installed and a GPU is visible (or FORCE_CUDA=1 with
# TORCH_CUDA_ARCH_LIST). pip's own cache could hand back an mmcv built against another torch
# (undefined symbols at import), or a CPU-only one on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.14.1
MMCV_VERSION=2.1.0
PY_TAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELHOUSE_ROOT=${DFMSD_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/dfmsd/wheelhouse}
CONSTRAINTS=requirements/constraints.txt

# The mmcv build this machine gets (cpu, or cu<CUDA>-sm<archs>), from the venv's torch; a
# venv without torch yet is stale anyway.
build_key() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    bash scripts/build_mmcv.sh key "$VENV/bin/python"
  else
    echo none
  fi
}
stamp_of() {
  local f
  for f in requirements/base.txt "$CONSTRAINTS" scripts/setup_env.sh scripts/build_mmcv.sh pyproject.toml; do
    if [ -f "$f" ]; then cat "$f"; fi
  done | cat - <(echo "mmcv build: $(build_key)") | sha256sum | cut -d' ' -f1
}
want=$(stamp_of)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating/refreshing $VENV (stamp changed or missing)"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
CFLAG=()
[ -f "$CONSTRAINTS" ] && CFLAG=(-c "$CONSTRAINTS")

"${PIP[@]}" install -q --upgrade "pip>=24" "${CFLAG[@]}"
# Build prerequisites of mmcv first: torch (exact), setuptools with pkg_resources,
# ninja for a parallel compile, and opencv headless so mmcv's metadata picks it.
"${PIP[@]}" install "${CFLAG[@]}" "torch==${TORCH_VERSION}" "torchvision==0.29.1" \
  "setuptools<81" wheel ninja "numpy<2" opencv-python-headless

KEY=$(bash scripts/build_mmcv.sh key "$VENV/bin/python")
WHEELHOUSE=$WHEELHOUSE_ROOT/torch-${TORCH_VERSION}-${PY_TAG}-${KEY}
LEGACY=$WHEELHOUSE_ROOT/torch-${TORCH_VERSION}-${PY_TAG}  # before the key: always a CPU-only build
if [ "$KEY" = cpu ] && ! ls "$WHEELHOUSE"/mmcv-${MMCV_VERSION}-*.whl >/dev/null 2>&1 \
   && ls "$LEGACY"/mmcv-${MMCV_VERSION}-*.whl >/dev/null 2>&1; then
  mkdir -p "$WHEELHOUSE" && cp "$LEGACY"/mmcv-${MMCV_VERSION}-*.whl "$WHEELHOUSE"/
fi
if ! ls "$WHEELHOUSE"/mmcv-${MMCV_VERSION}-*.whl >/dev/null 2>&1; then
  echo "[setup] building mmcv ${MMCV_VERSION} (${KEY}) against torch ${TORCH_VERSION}" \
       "(CPU only: about 10 min on 2 cores; with CUDA ops for one GPU architecture: about 4 min on 16 cores)"
  bash scripts/build_mmcv.sh build "$VENV/bin/python" "$WHEELHOUSE"
fi

"${PIP[@]}" install "${CFLAG[@]}" --find-links "$WHEELHOUSE" -r requirements/base.txt
# the wheelhouse's build, even where an mmcv 2.1.0 of another build is installed already
"${PIP[@]}" install --no-deps --force-reinstall "$WHEELHOUSE"/mmcv-${MMCV_VERSION}-*.whl
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -c "import mmcv.ops, mmdet, torchvision; from mmcv.ops import nms; print('[setup] ok: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
if [ "$KEY" != cpu ]; then  # the CUDA ops are compiled in, and run where a GPU is visible
  # (not mmcv.ops.get_compiling_cuda_version: it crashed the CUDA build on torch 2.11, docs/gpu.md)
  "$VENV/bin/python" -c "
import pathlib, torch, mmcv
from mmcv.ops import nms
ext = next(pathlib.Path(mmcv.__file__).parent.glob('_ext*.so'))
assert b'libc10_cuda.so' in ext.read_bytes(), f'{ext} was built without its CUDA ops'
if torch.cuda.is_available():
    b = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.]], device='cuda')
    assert nms(b, torch.tensor([0.9, 0.8], device='cuda'), 0.5)[1].tolist() == [0]
print('[setup] mmcv CUDA ops ok')"
fi
stamp_of > "$VENV/.setup-stamp"  # again: a fresh venv had no torch, so no build key, at the start
