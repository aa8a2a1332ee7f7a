"""DVC stage `teacher@<pair>-<role>`: a pair's weak or strong teacher, trained here from ground
truth, downloaded from the MMDetection model zoo, or imported from a local checkpoint; the last
two are checked against their sha256 before anything unpickles them."""

import argparse

from dfmsd.core import cli
from dfmsd.core.kinds import ROLES, TEACHER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--pair', required=True)
    parser.add_argument('--role', required=True, choices=ROLES)
    parser.add_argument('--out', required=True, help='model directory (model.pth, model.py, train.py)')
    parser.add_argument('--log', required=True, help='training-loss CSV')
    args = parser.parse_args()

    from dfmsd.core.params import StageParams, TrainedTeacher
    from dfmsd.engine import teachers

    p = StageParams()
    where = f'pairs.{args.pair}.{args.role}'
    spec = p.teacher(args.pair, args.role)
    identity = {'kind': TEACHER.name, 'pair': args.pair, 'role': args.role}
    if not isinstance(spec, TrainedTeacher):
        teachers.import_teacher(spec, p.data, args.out, args.log, identity, where)
        return
    teachers.train_teacher(
        spec,
        p.data,
        p.train,
        p.runtime,
        p.launch,
        out=args.out,
        loss_log=args.log,
        identity=identity,
        where=where,
    )


if __name__ == '__main__':
    cli.run(main)
