"""Each small detector config builds, trains a few steps and exports a stock checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

import dfmsd.models  # noqa: F401
from dfmsd.configs import apply_training_params, build_model_config
from dfmsd.evaluation import coco_metrics, predict_coco_json
from dfmsd.training import train_and_export

PARAMS = {'seed': 0, 'train': {'batch_size': 4, 'lr': 0.002}}


@pytest.mark.parametrize('detector', ['retinanet', 'fcos', 'gfl', 'faster_rcnn'])
def test_config_trains_and_exports(detector, tiny_dataset, tmp_path):
    entry = {'config': f'configs/small/{detector}.py', 'depth': 18, 'width': 8, 'fpn_channels': 16}
    cfg = build_model_config(entry, data_root=tiny_dataset, image_size=64, name=detector)
    classes = cfg.train_dataloader.dataset.metainfo['classes']
    assert len(classes) >= 3
    apply_training_params(cfg, PARAMS, iters=3)
    ckpt = train_and_export(cfg, name=detector, out_checkpoint=tmp_path / 'm.pth',
                            out_config=tmp_path / 'm.py', loss_csv=tmp_path / 'loss.csv',
                            work_root=tmp_path / 'work')
    # The exported file is tensors only: loads with torch's safe loader and no project code.
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state['state_dict'].values())
    assert state['meta']['iters'] == 3
    lines = (tmp_path / 'loss.csv').read_text().splitlines()
    assert lines[0].startswith('iter') and len(lines) >= 2

    from mmengine.config import Config
    preds = predict_coco_json(Config.fromfile(str(tmp_path / 'm.py')), ckpt, tmp_path / 'p.json',
                              score_thr=0.0)
    results = json.loads(preds.read_text())
    metrics = coco_metrics(tiny_dataset / 'annotations/instances_val.json', preds)
    assert set(metrics) >= {'mAP', 'AP50', 'AR@100', 'ARs', 'ARm', 'ARl'}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert all(r['category_id'] in range(1, len(classes) + 1) for r in results)


def test_width_overrides_reach_every_layer(tiny_dataset):
    from mmdet.registry import MODELS
    entry = {'config': 'configs/small/faster_rcnn.py', 'depth': 34, 'width': 8, 'fpn_channels': 24}
    cfg = build_model_config(entry, data_root=tiny_dataset, image_size=64)
    model = MODELS.build(cfg.model)
    feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24] * 5
    assert model.backbone.depth == 34
