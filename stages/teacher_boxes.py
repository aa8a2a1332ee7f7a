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

    from dfmsd.core.params import StageParams
    from dfmsd.evaluation import teacher_area_ratios

    p = StageParams()
    teacher_area_ratios(
        args.teacher,
        data=p.data,
        score_thr=p.me.teacher_score_thr,  # the one me key this stage declares; the others keep their defaults
        runtime=p.runtime,
        launch=p.launch,
        out=args.out,
    )


if __name__ == '__main__':
    cli.run(main)
