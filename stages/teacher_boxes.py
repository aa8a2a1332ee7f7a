"""DVC stage `teacher_boxes@<pair>`: the pair's weak teacher predicts boxes on the training
images once; r(I) = summed area of boxes scoring >= me.teacher_score_thr / image area, per
image (the ME size criterion, which may exceed 1)."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--teacher', required=True, help='the weak teacher model directory')
    parser.add_argument('--out', required=True, help='directory for predictions.bbox.json, area_ratios.json')
    args = parser.parse_args()

    from dfmsd.core.params import Data, Runtime, section, stage_params
    from dfmsd.engine.launch import launch_settings
    from dfmsd.evaluation import teacher_area_ratios

    p = stage_params()
    teacher_area_ratios(
        args.teacher,
        data=section(Data, p['data'], 'data'),
        score_thr=float(p['me']['teacher_score_thr']),
        runtime=section(Runtime, p['runtime'], 'runtime'),
        launch=launch_settings(p.get('launch')),
        out=args.out,
    )


if __name__ == '__main__':
    cli.run(main)
