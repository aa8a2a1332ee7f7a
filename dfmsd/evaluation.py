"""COCO-format predictions with mmdet's test loop, and box metrics with pycocotools.

Both run under torchrun when ``launch`` asks for several processes: mmengine's test loop
shards the images and gathers the results on rank 0, which writes the file.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from pathlib import Path

from mmengine.config import Config

from dfmsd.engine.checkpoint import allow_mmengine_checkpoints, load_weights
from dfmsd.report.metrics import METRIC_NAMES, REPORTED_METRICS


def predict_coco_json(cfg: Config, checkpoint: str | Path, out_json: str | Path, *, data_root: str,
                      ann_file: str, img_prefix: str, score_thr: float | None = None) -> Path | None:
    """Run ``checkpoint`` over a COCO-layout split; write its detections as COCO results.

    Returns the file on rank 0 (None on other ranks).
    """
    from mmengine.dist import is_main_process

    from dfmsd.engine.runner import build_runner
    allow_mmengine_checkpoints()
    load_weights(checkpoint, 'model')  # a clear error for a missing or damaged file
    cfg = copy.deepcopy(cfg)
    ds = cfg.test_dataloader.dataset
    ds.data_root, ds.ann_file, ds.data_prefix = str(data_root).rstrip('/') + '/', ann_file, dict(img=img_prefix)
    if score_thr is not None:
        test_cfg = cfg.model.test_cfg
        (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = score_thr
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_json.parent, prefix='.predict-') as tmp:
        cfg.work_dir = tmp
        cfg.load_from = str(checkpoint)
        cfg.resume = False
        prefix = f'{tmp}/pred'  # CocoMetric writes on rank 0 only
        cfg.test_evaluator = dict(type='CocoMetric', ann_file=os.path.join(ds.data_root, ds.ann_file),
                                  metric='bbox', format_only=True, outfile_prefix=prefix)
        cfg.pop('val_cfg', None), cfg.pop('val_dataloader', None), cfg.pop('val_evaluator', None)
        build_runner(cfg).test()
        if not is_main_process():
            return None
        os.replace(f'{prefix}.bbox.json', out_json)
    return out_json


def coco_metrics(ann_file: str | Path, results_json: str | Path) -> dict[str, float]:
    """COCO box metrics in percent. A model that predicts nothing scores zero everywhere."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    results = json.loads(Path(results_json).read_text())
    if not results:
        return {name: 0.0 for name in REPORTED_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = dict(zip(METRIC_NAMES, ev.stats))
    # COCOeval reports -1 where a size range has no ground truth; the tables show 0 there.
    return {name: round(max(float(stats[name]), 0.0) * 100, 2) for name in REPORTED_METRICS}


def evaluate_model(model_dir: str | Path, *, data, evaluate, launch, predictions: str | Path,
                   metrics: str | Path) -> dict | None:
    """Predictions and metrics of ``model_dir`` on the val and test splits, in one metrics file:
    the run's record (identity and cost, from run.json) plus ``{'val': {...}, 'test': {...}}``."""
    from mmengine.dist import is_main_process

    from dfmsd.core.io import read_json, write_json
    from dfmsd.data.coco import split_files
    from dfmsd.engine.launch import apply_launcher, maybe_relaunch
    maybe_relaunch(launch)
    import dfmsd.models  # noqa: F401
    model_dir = Path(model_dir)
    cfg = Config.fromfile(str(model_dir / 'model.py'))
    apply_launcher(cfg, launch)
    record = {**read_json(model_dir / 'run.json')}
    for split in ('val', 'test'):
        spec = data.splits[split]
        out = predict_coco_json(cfg, model_dir / 'model.pth', Path(predictions) / f'{split}.bbox.json',
                                data_root=data.root, ann_file=spec.ann, img_prefix=spec.img,
                                score_thr=evaluate.score_thr)
        if is_main_process():
            record[split] = coco_metrics(split_files(data, split)[0], out)
    if not is_main_process():
        return None
    write_json(metrics, record)
    print(f"[evaluate] {model_dir}: test " + ', '.join(f'{k} {v:.1f}' for k, v in record['test'].items()))
    return record


def teacher_area_ratios(teacher_dir: str | Path, *, data, score_thr: float, launch, out: str | Path) -> None:
    """The teacher's boxes on the training images, and r(I) per image (the ME size criterion)."""
    from collections import defaultdict

    from mmengine.dist import is_main_process

    from dfmsd.core.io import write_json
    from dfmsd.data.coco import area_ratio, load_json, split_files
    from dfmsd.engine.launch import apply_launcher, maybe_relaunch
    maybe_relaunch(launch)
    import dfmsd.models  # noqa: F401
    teacher_dir, out = Path(teacher_dir), Path(out)
    cfg = Config.fromfile(str(teacher_dir / 'model.py'))
    apply_launcher(cfg, launch)
    spec = data.splits['train']
    preds = predict_coco_json(cfg, teacher_dir / 'model.pth', out / 'predictions.bbox.json', data_root=data.root,
                              ann_file=spec.ann, img_prefix=spec.img)
    if not is_main_process():
        return
    images = load_json(split_files(data, 'train')[0])['images']
    boxes = defaultdict(list)
    for det in json.loads(preds.read_text()):
        if det['score'] >= score_thr:
            boxes[det['image_id']].append(det['bbox'])
    ratios = {str(im['id']): round(area_ratio(boxes[im['id']], im['width'], im['height']), 6) for im in images}
    write_json(out / 'area_ratios.json', {'score_thr': score_thr, 'area_ratios': ratios}, indent=None)
    print(f'[teacher_boxes] {len(ratios)} images, {sum(map(len, boxes.values()))} boxes >= {score_thr}')
