"""StageDistiller: frozen hidden teacher, stride matching, own preprocessors, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import dfmsd.models  # noqa: F401
from dfmsd.checkpoint import export_plain_checkpoint
from dfmsd.configs import apply_training_params, build_model_config, set_iterations
from dfmsd.models.distiller import DistillError, StageDistiller

init_default_scope('mmdet')
SMALL = dict(depth=18, width=8, fpn_channels=16)


def make_teacher(tmp_path, tiny_dataset, detector='faster_rcnn', name='teacher', **overrides):
    """A randomly initialised small detector saved as config + plain checkpoint."""
    cfg = build_model_config({'config': f'configs/small/{detector}.py', **SMALL, **overrides},
                             data_root=tiny_dataset, image_size=64)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    cfg.dump(str(tmp_path / f'{name}.py'))
    export_plain_checkpoint(model.state_dict(), tmp_path / f'{name}.pth')
    return cfg, tmp_path / f'{name}.py', tmp_path / f'{name}.pth'


def distiller_cfg(tiny_dataset, teacher_py, teacher_pth, feature_loss=None, **kw):
    student = build_model_config({'config': 'configs/small/retinanet.py', **SMALL},
                                 data_root=tiny_dataset, image_size=64)
    return student, dict(type='StageDistiller', student=student.model,
                         teacher=dict(config=str(teacher_py), checkpoint=str(teacher_pth)),
                         feature_loss=feature_loss or dict(type='DMKDLoss', loss_weight=2e-5),
                         **{'data_preprocessor': dict(type='BaseDataPreprocessor'), **kw})


def a_batch(model, tiny_dataset, n=2):
    from mmengine.dataset import pseudo_collate
    from mmdet.datasets import CocoDataset
    cfg = build_model_config({'config': 'configs/small/retinanet.py', **SMALL},
                             data_root=tiny_dataset, image_size=64)
    ds_cfg = cfg.train_dataloader.dataset
    ds = CocoDataset(**{k: v for k, v in ds_cfg.items() if k != 'type'})
    return pseudo_collate([ds[i] for i in range(n)])


def test_heterogeneous_levels_matched_by_stride(tiny_dataset, tmp_path):
    _, py, pth = make_teacher(tmp_path, tiny_dataset, 'faster_rcnn')  # P2-P6
    _, cfg = distiller_cfg(tiny_dataset, py, pth)                     # student RetinaNet P3-P7
    model = MODELS.build(cfg)
    assert [p['stride'] for p in model.level_pairs] == [8, 16, 32, 64]
    # Faster R-CNN's P3 is its level 1, RetinaNet's P3 its level 0.
    assert [(p['student_idx'], p['teacher_idx']) for p in model.level_pairs] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_teacher_frozen_hidden_and_unchanged_by_a_step(tiny_dataset, tmp_path):
    _, py, pth = make_teacher(tmp_path, tiny_dataset, 'faster_rcnn')
    _, cfg = distiller_cfg(tiny_dataset, py, pth, sfa_loss=dict(type='PKDLoss'))
    model = MODELS.build(cfg)
    model.init_weights()
    model.train()
    teacher = model.teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    names = dict(model.named_parameters())
    assert not any(n.startswith('teacher') for n in names)
    assert not any(k.startswith('teacher') for k in model.state_dict())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN running stats included

    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    data = model.data_preprocessor(a_batch(model, tiny_dataset), True)
    losses = model(**data, mode='loss')
    assert {'loss_distill_feat_s8', 'loss_distill_sfa_s8'} <= set(losses)
    total, log_vars = model.parse_losses(losses)
    # Distillation terms count in the optimised total (mmengine sums only keys with "loss").
    parts = sum(v for k, v in log_vars.items() if k != 'loss')
    assert float(log_vars['loss']) == pytest.approx(float(parts), rel=1e-5) and log_vars['loss_distill_feat_s8'] > 0
    optim.zero_grad()
    total.backward()
    optim.step()
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    student_grads = [p.grad for p in model.student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)


def test_teacher_uses_its_own_preprocessor(tiny_dataset, tmp_path):
    # A teacher with caffe-style preprocessing (BGR, mean only) must see exactly that.
    teacher_cfg, py, pth = make_teacher(tmp_path, tiny_dataset, 'retinanet')
    teacher_cfg.model.data_preprocessor.update(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0],
                                               bgr_to_rgb=False)
    teacher_cfg.dump(str(py))
    _, cfg = distiller_cfg(tiny_dataset, py, pth)
    model = MODELS.build(cfg)
    seen = {}
    model.teacher.backbone.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    raw = model.data_preprocessor(a_batch(model, tiny_dataset), True)
    model(**raw, mode='loss')
    img = raw['inputs'][0].float()  # BGR uint8 as loaded
    expected = img - torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    h, w = img.shape[-2:]
    assert torch.allclose(seen['x'][0, :, :h, :w], expected, atol=1e-4)


def test_no_common_stride_is_a_clear_error(tiny_dataset, tmp_path):
    _, py, pth = make_teacher(tmp_path, tiny_dataset, 'faster_rcnn')
    _, cfg = distiller_cfg(tiny_dataset, py, pth, distill_strides=[4])  # RetinaNet has no P2
    with pytest.raises(DistillError, match='share no FPN stride'):
        MODELS.build(cfg)


def test_teacher_checkpoint_not_matching_config(tiny_dataset, tmp_path):
    _, py, _ = make_teacher(tmp_path, tiny_dataset, 'faster_rcnn', name='a')
    _, _, other = make_teacher(tmp_path, tiny_dataset, 'retinanet', name='b')
    _, cfg = distiller_cfg(tiny_dataset, py, other)
    with pytest.raises(DistillError, match='does not match its config'):
        MODELS.build(cfg)


def test_nan_distillation_loss_stops_the_run(tiny_dataset, tmp_path):
    _, py, pth = make_teacher(tmp_path, tiny_dataset, 'retinanet')
    _, cfg = distiller_cfg(tiny_dataset, py, pth, feature_loss=dict(type='FeatureKDLoss', loss_weight=float('nan')))
    model = MODELS.build(cfg)
    data = model.data_preprocessor(a_batch(model, tiny_dataset), True)
    with pytest.raises(DistillError, match='loss_distill_feat_s8 is nan'):
        model(**data, mode='loss')


def test_distilled_checkpoint_loads_in_stock_mmdet(tiny_dataset, tmp_path):
    """Train 2 distillation steps, export, then load and predict in a process without dfmsd."""
    from dfmsd.evaluation import coco_metrics, predict_coco_json
    from dfmsd.training import train_and_export
    _, py, pth = make_teacher(tmp_path, tiny_dataset, 'faster_rcnn')
    student_cfg, model_cfg = distiller_cfg(tiny_dataset, py, pth)
    cfg = student_cfg.copy()
    cfg.model = model_cfg
    apply_training_params(cfg, {'seed': 0, 'train': {'batch_size': 2}}, iters=2)
    out = train_and_export(cfg, name='d', out_checkpoint=tmp_path / 's.pth', out_config=tmp_path / 's.py',
                           export_cfg=student_cfg, export_prefix='student.', work_root=tmp_path / 'w')
    ours = predict_coco_json(Config.fromfile(str(tmp_path / 's.py')), out, tmp_path / 'ours.json', score_thr=0.0)

    # Stock mmdet, no project code, mmdet's own test loop: the same predictions.
    stock = f'''
import sys
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile({str(tmp_path / 's.py')!r})
cfg.work_dir = {str(tmp_path / 'stock')!r}
cfg.load_from = {str(out)!r}
cfg.model.test_cfg.score_thr = 0.0
cfg.test_evaluator = dict(type='CocoMetric', ann_file=cfg.test_evaluator.ann_file, metric='bbox',
                          format_only=True, outfile_prefix={str(tmp_path / 'stock')!r})
Runner.from_cfg(cfg).test()
assert not any(m.startswith('dfmsd') for m in sys.modules), 'project code was imported'
print('STOCK_OK')
'''
    res = subprocess.run([sys.executable, '-c', stock], capture_output=True, text=True, cwd=tmp_path)
    assert 'STOCK_OK' in res.stdout, res.stderr[-3000:]
    stock_preds = tmp_path / 'stock.bbox.json'
    ann = tiny_dataset / 'annotations/instances_val.json'
    assert json.loads(stock_preds.read_text()) == json.loads(ours.read_text())
    assert coco_metrics(ann, stock_preds) == coco_metrics(ann, ours)


def test_distiller_with_normalising_preprocessor_is_a_clear_error(tiny_dataset, tmp_path):
    _, py, pth = make_teacher(tmp_path, tiny_dataset, 'faster_rcnn')
    student, cfg = distiller_cfg(tiny_dataset, py, pth)
    cfg['data_preprocessor'] = student.model.data_preprocessor  # normalising: mean/std
    with pytest.raises(DistillError, match='BaseDataPreprocessor'):
        MODELS.build(cfg)
    cfg['data_preprocessor'] = MODELS.build(student.model.data_preprocessor)  # a built module
    with pytest.raises(DistillError, match='DetDataPreprocessor'):
        MODELS.build(cfg)


def test_zero_weight_distillation_trains_the_student_exactly_like_plain_training(tiny_dataset, tmp_path):
    """Configs from distill_config, trained by mmengine's Runner as the stages do: with the
    distillation weight at 0, the student after 3 steps (weights and BN statistics) equals
    the plain student trained from the same init. Catches any difference in what the student
    sees: a second normalisation (the Runner hands a config's top-level data_preprocessor to
    a model that names none), another optimizer, schedule or data order."""
    from dfmsd.configs import distill_config, student_config
    from dfmsd.training import train_and_export
    models = tmp_path / 'models'
    models.mkdir()
    make_teacher(models, tiny_dataset, 'retinanet', name='teacher', **SMALL)
    params = {'seed': 0, 'data': {'root': str(tiny_dataset), 'image_size': 64},
              'train': {'batch_size': 2, 'lr': 0.01},
              'student': {'config': 'configs/small/retinanet.py', **SMALL},
              'teachers': {'teacher': {'config': 'configs/small/retinanet.py', **SMALL}},
              'distill': {'methods': {'pkd': {'feature_loss': {'type': 'PKDLoss', 'loss_weight': 0.0}}},
                          'runs': {'pkd': {'method': 'pkd', 'teacher': 'teacher',
                                           'init': str(models / 'init.pth'), 'iters': 3}}}}
    plain = student_config(params)
    torch.manual_seed(1)
    init = MODELS.build(plain.model)
    init.init_weights()
    export_plain_checkpoint(init.state_dict(), models / 'init.pth')

    apply_training_params(plain, params, iters=3)
    plain.load_from = str(models / 'init.pth')
    distill, student_cfg = distill_config(params, 'pkd', models_dir=str(models))
    outs = {}
    for name, cfg, extra in (('plain', plain, {}),
                             ('distill', distill, dict(export_cfg=student_cfg, export_prefix='student.'))):
        outs[name] = torch.load(train_and_export(cfg, name=name, out_checkpoint=tmp_path / f'{name}.pth',
                                                 out_config=tmp_path / f'{name}.py',
                                                 work_root=tmp_path / 'w', **extra),
                                weights_only=False)['state_dict']
    trained = [k for k in outs['plain'] if not torch.equal(outs['plain'][k], init.state_dict()[k])]
    assert 'backbone.bn1.running_mean' in trained and len(trained) > 50  # the steps did train
    assert outs['plain'].keys() == outs['distill'].keys()
    for key, value in outs['plain'].items():
        torch.testing.assert_close(outs['distill'][key], value, rtol=1e-5, atol=1e-6, msg=key)
