"""DVC stages that distil a student: `distill@...` (single-stage, strong teacher),
`distill_me@...` (single-stage with ME views) and `sal1@...` / `sal2@...` (SAL: the weak
teacher for the first part of one schedule, the strong one for the rest).

Every path is an argument; the method, student and training settings come from the params
this stage declares in dvc.yaml.
"""

import argparse

from dfmsd.core import cli

GROUPS = {'distill': 'methods', 'distill_me': 'me_methods', 'sal1': 'sal_methods', 'sal2': 'sal_methods'}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--kind', required=True, choices=GROUPS)
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

    from dfmsd.core.params import Data, Detector, Distill, Method, Runtime, SALMethod, Train, section, stage_params
    from dfmsd.engine.launch import launch_settings
    from dfmsd.engine.students import distill_student

    p = stage_params()
    group = GROUPS[args.kind]
    method = section(SALMethod if group == 'sal_methods' else Method, p[group][args.method], f'{group}.{args.method}')
    distill_student(
        kind=args.kind,
        method=method,
        student=section(Detector, p['students'][args.student], f'students.{args.student}'),
        data=section(Data, p['data'], 'data'),
        train=section(Train, p['train'], 'train'),
        distill=section(Distill, p['distill'], 'distill'),
        runtime=section(Runtime, p['runtime'], 'runtime'),
        launch=launch_settings(p.get('launch')),
        seed=args.seed,
        teacher=args.teacher,
        init=args.init,
        me_table=args.me_table,
        out=args.out,
        loss_log=args.log,
        identity={
            'kind': args.kind,
            'student': args.student,
            'pair': args.pair,
            'method': args.method,
            'group': group,
            'seed': args.seed,
        },
    )


if __name__ == '__main__':
    cli.run(main)
