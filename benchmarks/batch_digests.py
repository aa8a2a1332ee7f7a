"""Which training batches a distillation row sees: a digest of the input batch at chosen
iterations, to check whether the rows of one seed draw the same batches (then the strong
teacher's forward pass over them is the same in every row of that seed).

    DVC_STAGE=distill@retinanet-rn18_gfl34-mgd-0 python benchmarks/batch_digests.py \\
        --kind distill --student retinanet --pair rn18_gfl34 --method mgd --seed 0 \\
        --teacher models/teachers/rn18_gfl34/strong --init models/students/retinanet/seed0/init \\
        --out /tmp/bd/mgd --log /tmp/bd/mgd.csv

Takes `stages/distill.py`'s arguments (run it in a project whose teachers and student inits
exist; DVC_STAGE names the stage whose params it reads), and ``--digest-at 1,2,3``: the stage's
own steps to digest (a `sal2` stage's step 1 is the schedule's iteration 251). It trains until
the last of them, prints ``DIGESTS <method> [...]`` and stops. It trains in a temporary work
dir: it neither resumes from the stage's checkpoints nor leaves any. Nothing is exported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import runpy
import sys
import tempfile
from pathlib import Path

#: the default steps: the first ones, and the first ones of the second epoch (800 images /
#: batch 8), where the sampler draws a new order
DEFAULT_STEPS = '1,2,3,101,102,103'


def main() -> None:
    from dfmsd.engine import training
    from dfmsd.models.distiller import StageDistiller

    parser = argparse.ArgumentParser(add_help=False)  # the rest is stages/distill.py's
    parser.add_argument('--digest-at', default=DEFAULT_STEPS)
    parser.add_argument('--method', required=True)
    args, rest = parser.parse_known_args()
    steps = [int(step) for step in args.digest_at.split(',')]
    sys.argv[1:] = [*rest, '--method', args.method]  # what stages/distill.py parses
    loss, seen = StageDistiller.loss, []

    def digesting_loss(self, inputs, data_samples):
        digest = hashlib.sha256()
        for image in inputs:
            digest.update(image.contiguous().numpy().tobytes())
        seen.append(digest.hexdigest()[:12])
        if len(seen) >= max(steps):
            print('DIGESTS', args.method, json.dumps([seen[i - 1] for i in steps]), flush=True)
            raise SystemExit(0)
        return loss(self, inputs, data_samples)

    StageDistiller.loss = digesting_loss
    with tempfile.TemporaryDirectory() as work_root:  # a stage's own checkpoints would be resumed
        training.run_training.__kwdefaults__['work_root'] = Path(work_root)
        runpy.run_path('stages/distill.py', run_name='__main__')


if __name__ == '__main__':
    main()
