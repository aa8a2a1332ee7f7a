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
the last of them, prints ``DIGESTS <method> [...]`` and stops. Nothing is exported.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import sys

#: the default steps: the first ones, and the first ones of the second epoch (800 images /
#: batch 8), where the sampler draws a new order
DEFAULT_STEPS = '1,2,3,101,102,103'


def main() -> None:
    from dfmsd.models.distiller import StageDistiller

    argv = sys.argv[1:]
    steps = DEFAULT_STEPS
    if '--digest-at' in argv:
        at = argv.index('--digest-at')
        steps = argv.pop(at + 1)
        argv.pop(at)
    steps = [int(s) for s in steps.split(',')]
    sys.argv[1:] = argv  # what stages/distill.py parses
    method = argv[argv.index('--method') + 1]
    loss, seen = StageDistiller.loss, []

    def digesting_loss(self, inputs, data_samples):
        digest = hashlib.sha256()
        for image in inputs:
            digest.update(image.contiguous().numpy().tobytes())
        seen.append(digest.hexdigest()[:12])
        if len(seen) >= max(steps):
            print('DIGESTS', method, json.dumps([seen[i - 1] for i in steps]), flush=True)
            raise SystemExit(0)
        return loss(self, inputs, data_samples)

    StageDistiller.loss = digesting_loss
    runpy.run_path('stages/distill.py', run_name='__main__')


if __name__ == '__main__':
    main()
