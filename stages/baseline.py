"""DVC stage `baseline@<student>-<seed>`: the student trained from ground truth only, from its
seed's initialisation, for the budget every distillation row gets (train.iters)."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--student', required=True)
    parser.add_argument('--seed', type=int, required=True)
    parser.add_argument('--init', required=True, help="the seed's student_init model directory")
    parser.add_argument('--out', required=True, help='model directory')
    parser.add_argument('--log', required=True, help='training-loss CSV')
    args = parser.parse_args()

    from dfmsd.core.kinds import BASELINE
    from dfmsd.core.params import StageParams
    from dfmsd.engine.students import train_baseline

    p = StageParams()
    train_baseline(
        p.student(args.student),
        p.data,
        p.train,
        p.runtime,
        p.launch,
        seed=args.seed,
        init=args.init,
        out=args.out,
        loss_log=args.log,
        identity={'kind': BASELINE.name, 'student': args.student, 'seed': args.seed},
    )


if __name__ == '__main__':
    cli.run(main)
