"""COCO-format predictions with mmdet's test loop, and metrics with pycocotools."""
from __future__ import annotations

import contextlib
import io
import json
import os

import tempfile
from pathlib import Path

from mmengine.config import Config

from dfmsd.checkpoint import allow_mmengine_checkpoints
from dfmsd.training import build_runner

# pycocotools' COCOeval.stats order, reported in percent as in the paper's tables.
METRIC_NAMES = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR@1', 'AR@10', 'AR@100', 'ARs', 'ARm', 'ARl')
REPORTED_METRICS = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR@100', 'ARs', 'ARm', 'ARl')


def predict_coco_json(cfg: Config, checkpoint: str | Path, out_json: str | Path, *,
                      data_root: str | Path | None = None, ann_file: str | None = None,
                      img_prefix: str | None = None, score_thr: float | None = None) -> Path:
    """Run `checkpoint` over a COCO-layout split and write its detections as COCO results."""
    allow_mmengine_checkpoints()
    cfg = cfg.copy()
    ds = cfg.test_dataloader.dataset
    if data_root is not None:
        ds.data_root = str(data_root).rstrip('/') + '/'
    if ann_file is not None:
        ds.ann_file = ann_file
    if img_prefix is not None:
        ds.data_prefix = dict(img=img_prefix)
    if score_thr is not None:
        _set_score_thr(cfg.model, score_thr)
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_json.parent, prefix='.predict-') as tmp:
        cfg.work_dir = tmp
        cfg.load_from = str(checkpoint)
        cfg.resume = False
        cfg.test_evaluator = dict(type='CocoMetric', ann_file=os.path.join(ds.data_root, ds.ann_file),
                                  metric='bbox', format_only=True, outfile_prefix=f'{tmp}/pred')
        build_runner(cfg).test()
        os.replace(f'{tmp}/pred.bbox.json', out_json)
    return out_json


def _set_score_thr(model: Config, score_thr: float) -> None:
    test_cfg = model.test_cfg
    (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = score_thr


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


def write_json_atomic(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(obj, indent=2) + '\n')
    os.replace(tmp, path)



