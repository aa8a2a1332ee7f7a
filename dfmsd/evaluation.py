"""COCO-format predictions with mmdet's test loop, and box metrics with pycocotools.

Predictions of a model are computed into ``work_dirs/<stage>-<key>/`` (key: model weights,
model config, splits, score threshold), then copied to the stage's outputs and the work dir
removed. Under torchrun (``launch``), mmengine's test loop shards the images and gathers the
results on rank 0, which writes the files.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from dfmsd.core.io import WORK_ROOT, read_json, sha256_file, work_dir_label, write_json
from dfmsd.report.metrics import METRIC_NAMES, REPORTED_METRICS, run_record


def predict_splits(
    model_dir: Path,
    splits: dict[str, Any],
    out_dir: Path,
    *,
    data_root: str,
    score_thr: float | None,
    threads: int,
    launch,
) -> None:
    """``model_dir``'s COCO detections on each split, as ``out_dir/<split>.bbox.json`` (rank 0)."""
    import torch
    from mmengine.config import Config
    from mmengine.dist import barrier, is_main_process
    from mmengine.runner import TestLoop

    import dfmsd.models  # noqa: F401
    from dfmsd.engine.checkpoint import allow_mmengine_checkpoints, load_weights
    from dfmsd.engine.launch import apply_launcher
    from dfmsd.engine.runner import build_runner

    torch.set_num_threads(threads)
    allow_mmengine_checkpoints()
    checkpoint = model_dir / 'model.pth'
    load_weights(checkpoint, 'model')  # a clear error for a missing or damaged file
    cfg = Config.fromfile(str(model_dir / 'model.py'))
    apply_launcher(cfg, launch)
    if score_thr is not None:
        test_cfg = cfg.model.test_cfg
        (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = score_thr
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.work_dir, cfg.load_from, cfg.resume = str(out_dir / 'runner'), str(checkpoint), False
    for key in ('val_cfg', 'val_dataloader', 'val_evaluator'):
        cfg.pop(key, None)
    runner = build_runner(cfg)
    runner.call_hook('before_run')
    runner.load_or_resume()
    for split, spec in splits.items():
        loader = copy.deepcopy(cfg.test_dataloader)
        loader.dataset.update(
            data_root=str(data_root).rstrip('/') + '/', ann_file=spec.ann, data_prefix=dict(img=spec.img)
        )
        prefix = str(out_dir / f'.{split}')  # CocoMetric writes on rank 0 only
        evaluator = dict(
            type='CocoMetric',
            ann_file=os.path.join(data_root, spec.ann),
            metric='bbox',
            format_only=True,
            outfile_prefix=prefix,
        )
        loop = TestLoop(runner, loader, evaluator)
        # The ranks' parts meet in the work dir, not in ./.dist_test (CocoMetric has no such argument)
        for metric in loop.evaluator.metrics:
            metric.collect_dir = str(out_dir / 'runner' / 'collect')
        loop.run()
        if is_main_process():
            os.replace(f'{prefix}.bbox.json', out_dir / f'{split}.bbox.json')
    barrier()  # every rank writes its test-epoch log under out_dir: all are done before rank 0 removes it
    if is_main_process():
        shutil.rmtree(out_dir / 'runner', ignore_errors=True)


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


def cached_predictions(
    model_dir: str | Path, splits: dict[str, Any], *, data_root: str, score_thr: float | None, threads: int, launch
) -> Path | None:
    """The work dir holding ``<split>.bbox.json`` for every split, predicting them if needed.

    Returns None on ranks other than 0.
    """
    model_dir = Path(model_dir)
    key = hashlib.sha256(
        json.dumps(
            {
                'weights': sha256_file(model_dir / 'model.pth'),
                'config': sha256_file(model_dir / 'model.py'),
                'splits': {k: [v.ann, v.img] for k, v in splits.items()},
                'score_thr': score_thr,
                'threads': threads,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    work = WORK_ROOT / f'{work_dir_label(os.environ.get("DVC_STAGE", "predict"))}-{key}'
    if all((work / f'{s}.bbox.json').is_file() for s in splits):
        return work
    predict_splits(model_dir, splits, work, data_root=data_root, score_thr=score_thr, threads=threads, launch=launch)
    from mmengine.dist import is_main_process

    return work if is_main_process() else None


def evaluate_model(
    model_dir: str | Path, *, data, evaluate, runtime, launch, predictions: str | Path, metrics: str | Path
) -> dict | None:
    """Predictions and metrics of ``model_dir`` on val and test, in one metrics file: the run's
    record (identity and cost, from run.json) plus ``{'val': {...}, 'test': {...}}``."""
    from dfmsd.data.coco import split_files
    from dfmsd.engine.launch import maybe_relaunch

    maybe_relaunch(launch)
    splits = {s: data.splits[s] for s in ('val', 'test')}
    work = cached_predictions(
        model_dir, splits, data_root=data.root, score_thr=evaluate.score_thr, threads=runtime.threads, launch=launch
    )
    if work is None:
        return None
    record = read_json(Path(model_dir) / 'run.json')
    Path(predictions).mkdir(parents=True, exist_ok=True)
    for split in splits:
        shutil.copyfile(work / f'{split}.bbox.json', Path(predictions) / f'{split}.bbox.json')
        record[split] = coco_metrics(split_files(data, split)[0], work / f'{split}.bbox.json')
    run_record(record, str(metrics))  # what the report reads: a record it would reject is not written
    write_json(metrics, record)
    shutil.rmtree(work, ignore_errors=True)
    print(f'[evaluate] {model_dir}: test ' + ', '.join(f'{k} {v:.1f}' for k, v in record['test'].items()))
    return record


def teacher_area_ratios(teacher_dir: str | Path, *, data, score_thr: float, runtime, launch, out: str | Path) -> None:
    """The teacher's boxes on the training images, and r(I) per image (the ME size criterion)."""
    from dfmsd.data.coco import area_ratio, load_json, split_files
    from dfmsd.engine.launch import maybe_relaunch

    maybe_relaunch(launch)
    work = cached_predictions(
        teacher_dir,
        {'train': data.splits['train']},
        data_root=data.root,
        score_thr=None,
        threads=runtime.threads,
        launch=launch,
    )
    if work is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / 'train.bbox.json', out / 'predictions.bbox.json')
    images = load_json(split_files(data, 'train')[0])['images']
    boxes = defaultdict(list)
    for det in read_json(out / 'predictions.bbox.json'):
        if det['score'] >= score_thr:
            boxes[det['image_id']].append(det['bbox'])
    ratios = {str(im['id']): round(area_ratio(boxes[im['id']], im['width'], im['height']), 6) for im in images}
    write_json(out / 'area_ratios.json', {'score_thr': score_thr, 'area_ratios': ratios}, indent=None)
    shutil.rmtree(work, ignore_errors=True)
    print(f'[teacher_boxes] {len(ratios)} images, {sum(map(len, boxes.values()))} boxes >= {score_thr}')
