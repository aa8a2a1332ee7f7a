#!/usr/bin/env bash
# The GPU checks of issue 14 in one resumable sequence, for a lent machine whose commands
# may each run 10 minutes at most (docs/gpu.md has the figures it produced).
#
#   bash scripts/gpu/session.sh WAIT_SECONDS
#
# Starts (once per machine) a background worker that runs the steps below in order, each
# leaving a marker in /tmp/gpu/done/; then waits up to WAIT_SECONDS for it and packs what
# exists so far into $OUT (results.tar.gz, students.tar.gz, the mmcv wheel in 15 MB parts).
# Calling it again on the same machine just waits longer. Needs the wheels of
# mmengine/mmdet/pycocotools/pydantic... in .whl/ and mmcv's sdist + setuptools<81 in
# .whl/build/ (docs/gpu.md); a built mmcv wheel in .whl/ is installed instead of building.
#
# Steps: 1 build mmcv with CUDA ops (timed) and check its ops; 2 the embedded default on the
# GPU (fp32); 3 COCO-size steps on random weights (AMP off/on); 4 the default's students with
# AMP (fp16); 5 DFMSD under torchrun with NCCL and pinned-memory loaders.
set -uo pipefail
cd "$(dirname "$0")/../.."
WAIT=${1:-560}
G=/tmp/gpu
mkdir -p $G/done $G/out
# The worker runs from its own copy: a later call re-sends the working tree (and carried
# paths) and replaces them, which pulled the files from under the first worker here.
if [ ! -d $G/src ]; then
  mkdir -p $G/src && cp -a . $G/src/ && rm -rf $G/src/.whl && cp -aL .whl $G/src/.whl
fi
cd $G/src
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD

worker() {
  set -x
  {
    nvidia-smi; ls -la /dev/nvidia* ; python3 -c 'import numpy, setuptools, torch; print("numpy", numpy.__version__, "setuptools", setuptools.__version__, "torch", torch.__version__, torch.version.cuda)'
    gcc --version | head -1; nvcc --version | tail -2; nproc; echo "CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-unset}"
    python3 -c 'import numpy as np; print("np.core.multiarray._reconstruct:", np.core.multiarray._reconstruct)'
  } > $G/out/machine.txt 2>&1
  unset CUBLAS_WORKSPACE_CONFIG  # as on a user's machine: the project must set it itself
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > $G/out/pip.log 2>&1
  if ! python3 -c 'import mmcv.ops' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/buildsite .whl/build/setuptools-*.whl
    echo "key (GPU-derived): $(bash scripts/build_mmcv.sh key python3)" > $G/out/build.log
    start=$(date +%s)
    PYTHONPATH=/tmp/buildsite TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      bash scripts/build_mmcv.sh build python3 $G/wheelhouse .whl/build/mmcv-2.1.0.tar.gz >> $G/out/build.log 2>&1
    echo "build rc=$? wall=$(( $(date +%s) - start )) s" >> $G/out/build.log
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $G/wheelhouse/mmcv-*.whl >> $G/out/build.log 2>&1
    mkdir -p $G/wheel && (cd $G/wheel && split -b 15M $G/wheelhouse/mmcv-*.whl "$(basename $G/wheelhouse/mmcv-*.whl).part-")
  fi
  if ! python3 -c 'import mmcv.ops' >> $G/out/build.log 2>&1; then  # nothing below can run: stop waiting
    touch $G/done/build_failed $G/done/all
    return 1
  fi
  touch $G/done/build
  python3 -X faulthandler scripts/gpu/check_mmcv_ops.py > $G/out/ops.log 2>&1; echo "rc=$?" >> $G/out/ops.log
  touch $G/done/ops

  python3 scripts/gpu/default_on_gpu.py --iters 300 --teacher-iters 300 --cublas-check \
    --only baseline mgd dmkd pkd dfmsd --work $G/default --out $G/out/default > $G/out/default.log 2>&1
  echo "rc=$?" >> $G/out/default.log
  touch $G/done/default

  python3 scripts/gpu/coco_size_bench.py --out $G/out/coco_bench.json ${COCO_METHODS:+--methods $COCO_METHODS} \
    > $G/out/coco_bench.log 2>&1
  echo "rc=$?" >> $G/out/coco_bench.log
  touch $G/done/coco

  python3 scripts/gpu/default_on_gpu.py --iters 300 --amp fp16 --reuse $G/default --skip-eval \
    --only ${AMP_RUNS:-baseline mgd dmkd pkd dfmsd} --work $G/default_amp --out $G/out/default_amp > $G/out/default_amp.log 2>&1
  echo "rc=$?" >> $G/out/default_amp.log
  touch $G/done/amp

  DFMSD_LAUNCH_BACKEND=nccl python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29533 -- \
    scripts/gpu/default_on_gpu.py --iters 100 --pinned --reuse $G/default --skip-eval --only ${NCCL_RUNS:-mgd dfmsd} \
    --work $G/default_nccl --out $G/out/default_nccl > $G/out/default_nccl.log 2>&1
  echo "rc=$?" >> $G/out/default_nccl.log
  touch $G/done/nccl all
}

if [ ! -e $G/worker.pid ] || ! kill -0 "$(cat $G/worker.pid)" 2>/dev/null; then
  if [ ! -e $G/done/all ]; then
    setsid bash -c "$(declare -f worker); G=$G; export PYTHONUNBUFFERED=1 PYTHONPATH=$PYTHONPATH \
      COCO_METHODS='${COCO_METHODS:-}' AMP_RUNS='${AMP_RUNS:-}' NCCL_RUNS='${NCCL_RUNS:-}'; worker" \
      > $G/out/worker.log 2>&1 < /dev/null &
    echo $! > $G/worker.pid
  fi
fi

t0=$(date +%s)
while [ ! -e $G/done/all ] && [ $(( $(date +%s) - t0 )) -lt "$WAIT" ]; do
  sleep 5
done
echo "done markers: $(ls $G/done | tr '\n' ' ')"
for f in build.log ops.log; do [ -f $G/out/$f ] && tail -n 25 $G/out/$f; done
for f in default default_amp default_nccl; do [ -f $G/out/$f.log ] && grep -E '^==== .*(ok|FAILED)|^rc=' $G/out/$f.log | cut -c1-220 | tail -n 30; done
[ -f $G/out/coco_bench.log ] && grep -E "^\{|errors|rc=" $G/out/coco_bench.log | cut -c1-260 | tail -n 40

if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/results.tar.gz" -C $G out $(cd $G && ls -d default*/logs default*/metrics 2>/dev/null)
  students=$(cd $G && ls -d default/models/students/*/seed0/baseline default/models/students/*/seed0/*/{mgd,dfmsd} 2>/dev/null)
  [ -n "$students" ] && tar -czf "$OUT/students.tar.gz" -C $G $students
  if [ -z "${NO_WHEEL:-}" ] && [ -d $G/wheel ]; then cp $G/wheel/* "$OUT"/; fi
  ls -la "$OUT"
fi
