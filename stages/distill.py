"""DVC stages that distil a student: `distill@...` (single-stage, strong teacher),
`distill_me@...` (single-stage with ME views) and `sal1@...` / `sal2@...` (SAL: the weak
teacher for the first part of one schedule, the strong one for the rest).

Every path is an argument; the method, student and training settings come from the params
this stage declares in dvc.yaml.
"""

import argparse

from dfmsd.core import cli
from dfmsd.core.kinds import DISTILL_KINDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--kind', required=True, choices=DISTILL_KINDS)
    parser.add_argument('--student', required=True)
    parser.add_argument('--pair', required=True)
    parser.add_argument('--method', required=True)
    parser.add_argument('--seed', type=int, required=True)
    parser.add_argument('--teacher', required=True, help="this stage's teacher model directory")
    parser.add_argument('--init', required=True, help='student_init directory, or SAL stage 1 for sal2')
    parser.add_argument('--me-table', help='ME decision table (distill_me, and SAL stages with ME)')
    parser.add_argument('--out', required=True, help='model directory')
    parser.add_argument('--log', required=True, help='training-loss CSV')
    args = parser.parse_args()

    from dfmsd.core.params import StageParams
    from dfmsd.engine.students import distill_student

    p = StageParams()
    kind = DISTILL_KINDS[args.kind]
    distill_student(
        kind=kind,
        method=p.method(kind.group, args.method),
        student=p.student(args.student),
        data=p.data,
        train=p.train,
        distill=p.distill,
        runtime=p.runtime,
        launch=p.launch,
        seed=args.seed,
        teacher=args.teacher,
        init=args.init,
        me_table=args.me_table,
        out=args.out,
        loss_log=args.log,
        identity={
            'kind': kind.name,
            'student': args.student,
            'pair': args.pair,
            'method': args.method,
            'group': kind.group,
            'seed': args.seed,
        },
    )


if __name__ == '__main__':
    cli.run(main)
