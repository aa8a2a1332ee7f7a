#!/bin/bash
# A stage command with the environment a Dask nanny gives its worker (distributed.nanny.pre-spawn-environ:
# MALLOC_TRIM_THRESHOLD_=65536, OMP/MKL/OPENBLAS_NUM_THREADS=1), against the same without the trim
# threshold (what flows.stages.subprocess_env passes on): one `distill_me` training of the default's
# first student, pair and ME method (seed 0), ITERS iterations, the two interleaved ROUNDS times.
# Process CPU and minor faults from /usr/bin/time; whether both wrote the same loss log and model.
#   bash benchmarks/stage_env.sh PROJECT [ITERS] [ROUNDS]
# PROJECT: a workspace whose default pipeline has run (a clone after `make repro`); its outputs are
# only read: the trainings run in a scratch DVC repository of links to them, with ITERS in its params.
set -euo pipefail
project=$(realpath "$1"); iters=${2:-40}; rounds=${3:-1}
py="$project/.venv/bin/python"
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
for d in data models configs stages dfmsd; do ln -s "$project/$d" "$d"; done
cp "$project/dvc.yaml" .
printf '%s\n' data models configs stages dfmsd work_dirs 'out_*' '*.csv' '*.out' > .gitignore
read -r student pair method < <("$py" - "$project/params.yaml" "$iters" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p['train'].update(iters=int(sys.argv[2]), checkpoint_interval=int(sys.argv[2]))
yaml.safe_dump(p, open('params.yaml', 'w'), sort_keys=False)
print(next(iter(p['students'])), next(iter(p['pairs'])), next(iter(p['me_methods'])))
PY
)
git init -q && "$py" -m dvc init -q && git add -A && git -c user.name=bench -c user.email=bench@localhost commit -qm scratch
run() {  # TAG ENV...: one training from scratch
  local tag=$1; shift
  rm -rf work_dirs "out_$tag"
  env "$@" DVC_STAGE="distill_me@$student-$pair-$method-0" PYTHONPATH="$project" \
    /usr/bin/time -f "%U s user, %S s system, %e s wall, %R minor faults" "$py" stages/distill.py \
    --kind distill_me --student "$student" --pair "$pair" --method "$method" --seed 0 \
    --teacher "models/teachers/$pair/strong" --init "models/students/$student/seed0/init" \
    --me-table "data/me/$pair/seed0.json" --out "out_$tag" --log "$tag.csv" > "$tag.out" 2>&1 || { tail "$tag.out"; exit 1; }
  tail -1 "$tag.out"
}
nanny=(MALLOC_TRIM_THRESHOLD_=65536 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1)
for round in $(seq "$rounds"); do
  echo "round $round, the nanny's environment:     $(run nanny "${nanny[@]}")"
  echo "round $round, without its trim threshold:  $(run stage "${nanny[@]:1}")"
  cmp -s nanny.csv stage.csv && cmp -s out_nanny/model.pth out_stage/model.pth \
    && echo "round $round: the same loss log and model bytes" || echo "round $round: the results DIFFER"
done
