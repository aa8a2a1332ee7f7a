"""DVC stage `teacher@<pair>-<role>`: a pair's weak or strong teacher, trained here from ground
truth, downloaded from the MMDetection model zoo, or imported from a local checkpoint; the last
two are checked against their sha256 before anything unpickles them."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--pair', required=True)
    parser.add_argument('--role', required=True, choices=('weak', 'strong'))
    parser.add_argument('--out', required=True, help='model directory (model.pth, model.py, train.py)')
    parser.add_argument('--log', required=True, help='training-loss CSV')
    args = parser.parse_args()

    from dfmsd.core.params import Data, Runtime, Train, TrainedTeacher, section, stage_params, teacher
    from dfmsd.engine import teachers
    from dfmsd.engine.launch import launch_settings

    p = stage_params()
    data = section(Data, p['data'], 'data')
    where = f'pairs.{args.pair}.{args.role}'
    spec = teacher(p['pairs'][args.pair][args.role], where)
    identity = {'kind': 'teacher', 'pair': args.pair, 'role': args.role}
    if not isinstance(spec, TrainedTeacher):
        teachers.import_teacher(spec, data, args.out, args.log, identity, where)
        return
    teachers.train_teacher(
        spec,
        data,
        section(Train, p['train'], 'train'),
        section(Runtime, p['runtime'], 'runtime'),
        launch_settings(p.get('launch')),
        out=args.out,
        loss_log=args.log,
        identity=identity,
        where=where,
    )


if __name__ == '__main__':
    cli.run(main)
