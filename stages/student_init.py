"""DVC stage `student_init@<student>-<seed>`: the seeded random initialisation that the
baseline and every distillation run of this seed start from, so that their differences come
from the training signal, not from the draw of initial weights."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--student', required=True)
    parser.add_argument('--seed', type=int, required=True)
    parser.add_argument('--out', required=True, help='model directory (model.pth, model.py)')
    args = parser.parse_args()

    from dfmsd.core.params import StageParams
    from dfmsd.engine.students import init_student

    p = StageParams()
    init_student(p.student(args.student), p.data, args.seed, args.out, f'students.{args.student}')


if __name__ == '__main__':
    cli.run(main)
