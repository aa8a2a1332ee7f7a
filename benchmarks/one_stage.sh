#!/usr/bin/env bash
# Time real training stages of the default grid, one at a time, as `dvc repro` runs them:
#
#   bash benchmarks/one_stage.sh distill@retinanet-rn18_gfl34-mgd-0 [STAGE ...]
#
# In a scratch copy of HEAD (under $TMPDIR) whose teachers train for 20 iterations only: a
# step's cost does not depend on the teacher's weights, and the teachers' own 40 minutes are
# skipped. Each stage's output lines carry seconds since its start (the training's set-up, its
# iterations, its export), then /usr/bin/time's wall and CPU seconds. Uses this checkout's .venv.
set -euo pipefail
source "$(dirname "$0")/scratch_copy.sh"
python - <<'PY'
import yaml
params = yaml.safe_load(open('params.yaml'))
for pair in params['pairs'].values():
    for teacher in pair.values():
        teacher['iters'] = 20
yaml.safe_dump(params, open('params.yaml', 'w'), sort_keys=False)
PY
git init -q && git add -A && git -c user.email=bench@dfmsd -c user.name=bench commit -qm scratch
rm -f dvc.lock
for stage in "$@"; do
  echo "=== $stage"
  # its upstream stages first, untimed (the short teachers, the student's init, ME's tables)
  for up in $(python - "$stage" <<'PY'
import sys

import networkx as nx
from dvc.repo import Repo

with Repo('.') as repo:
    graph = repo.index.graph  # edges point upstream
    (target,) = [s for s in graph.nodes if s.addressing == sys.argv[1]]
    upstream = graph.subgraph(nx.descendants(graph, target))
    print(' '.join(s.addressing for s in reversed(list(nx.topological_sort(upstream)))))
PY
  ); do
    dvc repro --single-item "$up" >/dev/null
  done
  /usr/bin/time -f "$stage: WALL %e s  USER %U s  SYS %S s" dvc repro --single-item "$stage" 2>&1 \
    | python -u -c 'import sys, time
t0 = time.time()
for line in sys.stdin: print(f"{time.time() - t0:7.1f} {line}", end="")'
done
