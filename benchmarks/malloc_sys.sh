#!/bin/bash
# Is glibc's allocator the system time of `make repro`? One plain training of the default student
# (benchmarks/concurrency.py's train: 60 iterations, 1 thread), with glibc's malloc defaults and
# with its mmap and trim thresholds at 1 GiB (freed memory kept, not returned and faulted in again),
# interleaved. Run in a project whose data stage has run:  bash benchmarks/malloc_sys.sh [ROUNDS]
set -euo pipefail
run() {
  env "$@" /usr/bin/time -f '%U s user, %S s system, %e s wall, %R minor faults' .venv/bin/python -c "
import sys, tempfile; sys.path.insert(0, 'benchmarks'); from concurrency import train
train(60, 1, 0, tempfile.mkdtemp())" 2>&1 | tail -1
}
for round in $(seq "${1:-2}"); do
  echo "round $round, glibc defaults:        $(run DFMSD_BENCH=1)"
  echo "round $round, mmap/trim at 1 GiB:    $(run MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824)"
done
