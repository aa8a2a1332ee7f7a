#!/usr/bin/env bash
# What the flow's teacher-feature memo (dfmsd.models.teacher_memo) saves a real stage, and that it
# changes none of its bytes:
#
#   bash benchmarks/teacher_memo.sh [METHOD] [ITERS] [ROUNDS]     # default: fkd 60 2
#
# In a scratch copy of HEAD (under $TMPDIR) whose teachers train for 20 iterations (a step's cost
# does not depend on the teacher's weights) and whose students train ITERS iterations, seed 0:
# `distill@...-mgd-0` fills a memo; then, interleaved ROUNDS times, `distill@...-METHOD-0` runs
# without a memo and with that one (every batch a hit). Prints each run's process CPU (user +
# system, /usr/bin/time) and whether its model.pth and loss log equal the run without a memo.
set -euo pipefail
METHOD=${1:-fkd}; ITERS=${2:-60}; ROUNDS=${3:-2}
source "$(dirname "$0")/scratch_copy.sh"
python - "$ITERS" <<'PY'
import sys

import yaml
params = yaml.safe_load(open('params.yaml'))
for pair in params['pairs'].values():
    for teacher in pair.values():
        teacher['iters'] = 20
params['train'].update(iters=int(sys.argv[1]), checkpoint_interval=int(sys.argv[1]))
yaml.safe_dump(params, open('params.yaml', 'w'), sort_keys=False)
PY
git init -q && git add -A && git -c user.email=bench@dfmsd -c user.name=bench commit -qm scratch
rm -f dvc.lock
run=retinanet-rn18_gfl34
for up in data teacher@rn18_gfl34-strong student_init@retinanet-0; do dvc repro --single-item "$up" >/dev/null; done
out=models/students/retinanet/seed0/rn18_gfl34/$METHOD
log=logs/students/retinanet/seed0/rn18_gfl34/$METHOD.csv
cpu() {  # TAG [ENV...]: the METHOD stage from scratch; its CPU seconds, model and log kept as TAG
  local tag=$1; shift
  env "$@" /usr/bin/time -f '%U %S' -o "$tag.time" dvc repro --force --single-item "distill@$run-$METHOD-0" > "$tag.out" 2>&1 \
    || { tail "$tag.out"; exit 1; }
  cp "$out/model.pth" "$tag.pth" && cp "$log" "$tag.csv"
  read -r user sys < "$tag.time"
  python -c "print(f'{$user + $sys:.1f}')"
}
memo=$SCRATCH/memo
DFMSD_TEACHER_MEMO=$memo dvc repro --single-item "distill@$run-mgd-0" > fill.out 2>&1 || { tail fill.out; exit 1; }
echo "# bash benchmarks/teacher_memo.sh $METHOD $ITERS $ROUNDS: distill@$run-$METHOD-0, $ITERS iterations; the memo: $(find "$memo" -name '*.pt' | wc -l) batches, $(du -sh "$memo" | cut -f1), filled by distill@$run-mgd-0"
echo "round  without memo  with memo  ratio  same model.pth  same loss log"
for round in $(seq "$ROUNDS"); do
  a=$(cpu plain) ; b=$(cpu memo DFMSD_TEACHER_MEMO="$memo")
  same_model=$(cmp -s plain.pth memo.pth && echo yes || echo NO)
  same_log=$(cmp -s plain.csv memo.csv && echo yes || echo NO)
  printf '%5s  %10s s  %7s s  %5s  %14s  %13s\n' "$round" "$a" "$b" "$(python -c "print(f'{$b / $a:.2f}')")" "$same_model" "$same_log"
  grep -h '\[teacher-memo\]' memo.out | sed 's/^/       /'
done
