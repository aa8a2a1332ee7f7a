"""DVC stage `teacher_boxes`: the weak teacher's boxes on the training images, once.

Writes data/teacher_boxes/predictions.bbox.json (COCO results) and area_ratios.json:
per image r(I) = summed area of boxes scoring >= score_thr / image area (the ME size
criterion, which may exceed 1).
"""
from dfmsd import cli


def main() -> None:
    import json
    from collections import defaultdict
    from pathlib import Path

    import dfmsd.models  # noqa: F401
    from mmengine.config import Config

    from dfmsd.augment import area_ratio
    from dfmsd.configs import data_layout
    from dfmsd.evaluation import predict_coco_json, write_json_atomic
    from dfmsd.params import get, load_params
    params = load_params()
    teacher = get(params, 'teacher_boxes.teacher')
    score_thr = float(get(params, 'teacher_boxes.score_thr'))
    root = get(params, 'data.root')
    layout = data_layout(get(params, 'data'))
    out_dir = Path('data/teacher_boxes')
    preds = predict_coco_json(Config.fromfile(f'models/{teacher}.py'), f'models/{teacher}.pth',
                              out_dir / 'predictions.bbox.json', data_root=root,
                              ann_file=layout['train_ann'], img_prefix=layout['train_img'])
    images = json.loads(Path(root, layout['train_ann']).read_text())['images']
    boxes = defaultdict(list)
    for det in json.loads(preds.read_text()):
        if det['score'] >= score_thr:
            boxes[det['image_id']].append(det['bbox'])
    ratios = {str(im['id']): round(area_ratio(boxes[im['id']], im['width'], im['height']), 6)
              for im in images}
    write_json_atomic({'teacher': teacher, 'score_thr': score_thr, 'area_ratios': ratios},
                      out_dir / 'area_ratios.json')
    print(f'[teacher_boxes] {len(ratios)} images, {sum(map(len, boxes.values()))} boxes >= {score_thr}')


if __name__ == '__main__':
    cli.run(main)
