#!/usr/bin/env bash
# Create or refresh the project virtual environment (.venv).
#
# Re-runs only when the requirement files or this script changed (a stamp in .venv
# records their hash). mmcv 2.1.0 has no wheel for our torch, so it is compiled once
# from its sdist and kept in a wheelhouse keyed by the torch version: pip's own cache
# could hand back an mmcv built against another torch (undefined symbols at import).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.14.1
MMCV_VERSION=2.1.0
PY_TAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELHOUSE=${DFMSD_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/dfmsd/wheelhouse}/torch-${TORCH_VERSION}-${PY_TAG}
CONSTRAINTS=requirements/constraints.txt

stamp_of() {
  local f
  for f in requirements/base.txt "$CONSTRAINTS" scripts/setup_env.sh pyproject.toml; do
    if [ -f "$f" ]; then cat "$f"; fi
  done | sha256sum | cut -d' ' -f1
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

if ! ls "$WHEELHOUSE"/mmcv-${MMCV_VERSION}-*.whl >/dev/null 2>&1; then
  echo "[setup] building mmcv ${MMCV_VERSION} against torch ${TORCH_VERSION} (about 10 min on 2 cores)"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==${MMCV_VERSION}" -d "$build"
  tar -xzf "$build"/mmcv-${MMCV_VERSION}.tar.gz -C "$build"
  # torch >= 2.10 headers need C++20; mmcv's setup.py hard-codes older standards.
  sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$build/mmcv-${MMCV_VERSION}/setup.py"
  mkdir -p "$WHEELHOUSE"
  (cd "$build/mmcv-${MMCV_VERSION}" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$OLDPWD/$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$build/out" .)
  mv "$build"/out/mmcv-*.whl "$WHEELHOUSE"/
fi

"${PIP[@]}" install "${CFLAG[@]}" --find-links "$WHEELHOUSE" -r requirements/base.txt
"${PIP[@]}" install --no-deps -e .
"$VENV/bin/python" -c "import mmcv.ops, mmdet, torchvision; from mmcv.ops import nms; print('[setup] ok: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
echo "$want" > "$VENV/.setup-stamp"
