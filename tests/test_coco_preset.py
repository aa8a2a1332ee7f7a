"""presets/coco.yaml: every teacher resolves in mmdet's model zoo, every model of the
default runs and of the paper grid builds (CPU, no weights) and shares FPN strides with
its teachers, each run's distiller config is complete, and DVC parses the pipeline.

No COCO images are needed: the project copy gets COCO 2017-named annotation files that
hold only the 80 categories.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_project

VENV_BIN = str(Path(sys.executable).parent)
ITERS_24_EPOCHS = 177430  # 118,287 images x 24 epochs / 16 per batch


def run(cmd, cwd, check=True):
    env = dict(os.environ, PATH=f'{VENV_BIN}:{os.environ["PATH"]}', DVC_NO_ANALYTICS='1')
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f'{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}')
    return res


@pytest.fixture(scope='module')
def project(tmp_path_factory) -> Path:
    from mmdet.datasets import CocoDataset
    root = copy_project(tmp_path_factory.mktemp('coco') / 'p')
    run([sys.executable, '-m', 'dfmsd.presets', 'coco'], root)
    categories = [{'id': i + 1, 'name': name} for i, name in enumerate(CocoDataset.METAINFO['classes'])]
    for split in ('train2017', 'val2017'):
        (root / 'data/coco' / split).mkdir(parents=True)
        ann = root / f'data/coco/annotations/instances_{split}.json'
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps({'images': [], 'annotations': [], 'categories': categories}))
    return root


@pytest.fixture(scope='module')
def params(project) -> dict:
    return yaml.safe_load((project / 'params.yaml').read_text())


def grid_rows(params):
    """(group, row name, row, teachers in SAL order) for every grid row."""
    for group_name, group in params['grid'].items():
        for row_name, row in group['rows'].items():
            teachers = list(row.get('teachers') or group.get('teachers') or [])
            yield group_name, row_name, row, teachers


def row_teachers(row, teachers):
    """The teachers a row distills from: none (baseline), each in turn (DFMSD), or the last."""
    if row['method'] == 'baseline':
        return []
    if row['method'] == 'dfmsd':
        return teachers[:row.get('stages', len(teachers))]
    return teachers[-1:]


def zoo_names(params) -> set[str]:
    names = {t['zoo'] for t in params['teachers'].values()}
    for _, _, row, teachers in grid_rows(params):
        names.update(teachers)
    return names


def student_configs(params) -> set[str]:
    return {params['student']['config']} | {row['student'] for _, _, row, _ in grid_rows(params)}


# ----------------------------------------------------------------------------- params

def test_preset_settings(params):
    data = params['data']
    assert data['root'] == 'data/coco' and data['generate'] is False and data['image_size'] is None
    assert (data['train_ann'], data['train_img']) == ('annotations/instances_train2017.json', 'train2017/')
    assert (data['val_ann'], data['val_img']) == ('annotations/instances_val2017.json', 'val2017/')
    assert params['launch']['nproc_per_node'] * params['train']['batch_size'] == 16
    assert params['launch']['backend'] == 'nccl'
    assert params['train']['optimizer'] == {'type': 'SGD', 'momentum': 0.9, 'weight_decay': 1e-4}  # lr: each config's own
    assert 'lr' not in params['train']  # the small presets' AdamW learning rate is gone
    runs = {**params['distill']['runs'], **params['distill']['me_runs']}
    assert set(runs) == {'mgd', 'dmkd', 'pkd', 'dfmsd_stage1', 'dfmsd_stage2'}
    assert {r['iters'] for r in runs.values()} == {params['student']['iters']} == {ITERS_24_EPOCHS}
    assert all(r['teacher'] == 'teacher_strong' for k, r in runs.items() if k in ('mgd', 'dmkd', 'pkd'))
    assert params['teachers']['teacher_weak']['zoo'].startswith('mask-rcnn_swin-t')
    assert params['teachers']['teacher_strong']['zoo'].startswith('mask-rcnn_swin-s')


def test_grid_records_the_papers_numbers(params):
    groups = params['grid']
    for key in ('table1_vit_to_cnn', 'table2_cascade_teachers', 'table3_retinanet_teachers',
                'table3_gfl_teachers', 'table4_fcos_teachers', 'table6_retinanet', 'table6_reppoints',
                'table6_gfl', 'table6_fcos'):
        assert key in groups
    rows = {(g, r): row for g, r, row, _ in grid_rows(params)}
    assert rows['table1_vit_to_cnn', 'faster_rcnn_dfmsd']['paper'] == {'mAP': 43.1}
    assert rows['table6_retinanet', 'dfmsd']['paper'] == {'mAP': 42.0}
    assert rows['table6_retinanet', 'mgd']['paper'] == {'mAP': 41.0}
    assert rows['table6_retinanet', 'dmkd']['paper'] == {'mAP': 41.5}
    assert rows['table2_cascade_teachers', 'retinanet_dfmsd']['paper'] == {'mAP': 40.1}
    assert 'paper' not in rows['table1_vit_to_cnn', 'fcos_dfmsd']  # lost in the text: left out
    for (group, name), row in rows.items():
        assert row['method'] in {'baseline', 'fkd', 'fgd', 'mgd', 'amd', 'dmkd', 'pkd', 'crosskd', 'dfmsd'}
        if 'paper' in row:
            assert 30 < row['paper']['mAP'] < 50, (group, name)
        if row['method'] != 'baseline':
            assert len(row_teachers(row, list(row.get('teachers') or params['grid'][group]['teachers']))) >= 1


def test_every_zoo_teacher_resolves_to_a_verifiable_url(params):
    from dfmsd.zoo import find_model
    names = zoo_names(params)
    assert len(names) >= 13
    for name in names:
        model = find_model(name)
        assert model.name == name  # exact model-index names, no fuzzy match
        assert model.url.startswith('https://download.openmmlab.com/'), model
        assert re.fullmatch(r'[0-9a-f]{8,64}', model.sha256_prefix), model
        assert Path(model.config).is_file()


def test_student_configs_resolve_through_the_zoo(params):
    from dfmsd.configs import resolve_config_path
    from dfmsd.params import ParamsError
    for config in student_configs(params):
        assert config.startswith('zoo:')
        assert resolve_config_path(config, 'student').is_file()
    with pytest.raises(ParamsError, match='models.student.config.*retinanet_r50_fpn_2x_coco'):
        resolve_config_path('zoo:retinanet_r50_fpn_2x_cocoo', 'student')


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope='module')
def fpn_levels(project, params):
    """Build every teacher and student once (CPU, random weights) -> its FPN (stride, channels)."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.configs import build_model_config, data_layout
    from dfmsd.models.distiller import probe_fpn
    from dfmsd.zoo import find_model
    init_default_scope('mmdet')
    data = dict(params['data'], root=str(project / 'data/coco'))
    levels = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # light on a shared CPU; restored: other tests compare exact floats
    try:
        for name in sorted(zoo_names(params)):  # teachers: the zoo config, as the teacher stage dumps it
            model = MODELS.build(Config.fromfile(find_model(name).config).model)
            levels[name] = probe_fpn(model)
            del model
        for config in sorted(student_configs(params)):  # students: through params -> config
            cfg = build_model_config({'config': config}, data_root=data['root'], image_size=data['image_size'],
                                     name='student', layout=data_layout(data))
            model = MODELS.build(cfg.model)
            assert sum(p.numel() for p in model.parameters()) > 1e7
            levels[config] = probe_fpn(model)
            del model
    finally:
        torch.set_num_threads(threads)
    return levels


def test_every_model_builds_and_every_pair_shares_fpn_strides(params, fpn_levels):
    from dfmsd.models.distiller import StageDistiller
    pairs = {(params['student']['config'], t['zoo']) for t in params['teachers'].values()}
    for _, _, row, teachers in grid_rows(params):
        pairs |= {(row['student'], t) for t in row_teachers(row, teachers)}
    for student, teacher in sorted(pairs):
        matched = StageDistiller._match_levels(fpn_levels[student], fpn_levels[teacher], None)
        assert {p['stride'] for p in matched} >= {8, 16, 32, 64}, (student, teacher)


# ----------------------------------------------------------------------------- distillation

def _check_distiller_cfg(cfg, student_cfg, run, *, me: bool, iters: int):
    assert cfg.model.type == 'StageDistiller'
    assert cfg.model.teacher == dict(config=f'models/{run["teacher"]}.py', checkpoint=f'models/{run["teacher"]}.pth')
    assert cfg.model.student == student_cfg.model and cfg.model.student_init == run['init']
    student = cfg.model.student
    assert (student.roi_head.bbox_head if 'roi_head' in student else student.bbox_head).num_classes == 80
    own_lr = student_cfg.optim_wrapper.optimizer.lr  # the student's mmdet config value, kept
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=own_lr, momentum=0.9, weight_decay=1e-4)
    assert own_lr in (0.01, 0.02)
    assert cfg.train_cfg.max_iters == iters and cfg.train_dataloader.batch_size == 2
    assert cfg.param_scheduler[0]['end'] == min(500, iters) and cfg.log_processor.by_epoch is False
    ds = cfg.train_dataloader.dataset
    if me:
        assert cfg.model.aug_loss_weight > 0 and ds.type == 'ConcatDataset'
        ds = ds.datasets[0]
    else:
        assert cfg.model.aug_loss_weight == 0
    assert ds.data_root.endswith('data/coco/')
    assert (ds.ann_file, ds.data_prefix) == ('annotations/instances_train2017.json', dict(img='train2017/'))
    assert 'launcher' not in cfg  # set only inside a torchrun worker


def test_default_runs_build_distiller_configs(project, params, monkeypatch):
    from dfmsd.configs import distill_config
    monkeypatch.chdir(project)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    distill = params['distill']
    for name, run in {**distill['runs'], **distill['me_runs']}.items():
        me = name in distill['me_runs']
        cfg, student_cfg = distill_config(params, name, me_data_root='data/augmented' if me else None)
        _check_distiller_cfg(cfg, student_cfg, run, me=me, iters=ITERS_24_EPOCHS)
        assert student_cfg.model.type == 'RetinaNet'


def test_grid_rows_build_distiller_configs(project, params, monkeypatch):
    """Each grid row of an implemented method, set up as the docs say (its teachers under
    `teachers:`, its student config, one run per SAL stage), gives a distiller config."""
    from dfmsd.configs import distill_config
    monkeypatch.chdir(project)
    checked = 0
    for group, name, row, teachers in grid_rows(params):
        if row['method'] not in params['distill']['methods']:
            continue
        used = row_teachers(row, teachers)
        p = dict(params, teachers={f't{i}': {'zoo': t} for i, t in enumerate(used)},
                 student={'config': row['student'], 'iters': 8})
        runs, init = {}, 'models/student_init.pth'
        for i in range(len(used)):  # SAL stage i from teacher i, starting from stage i-1's student
            runs[f's{i}'] = {'method': row['method'], 'teacher': f't{i}', 'init': init, 'iters': 8}
            init = f'models/s{i}.pth'
        *earlier, last = runs  # DFMSD: ME in the last stage only; single-stage methods: one run
        me_runs = {last: runs.pop(last)} if row['method'] == 'dfmsd' else {}
        p['distill'] = dict(params['distill'], runs=runs, me_runs=me_runs)
        for run_name, run in {**runs, **me_runs}.items():
            me = run_name in p['distill']['me_runs']
            cfg, student_cfg = distill_config(p, run_name, me_data_root='data/augmented' if me else None)
            _check_distiller_cfg(cfg, student_cfg, run, me=me, iters=8)
            checked += 1
    assert checked >= 60


# ----------------------------------------------------------------------------- stages, DVC

def test_report_rows_name_only_models_the_preset_makes(params):
    made = set(params['teachers']) | {'student'} | set(params['distill']['runs']) \
        | set(params['distill']['me_runs'])
    for name, row in params['report']['rows'].items():
        assert name in made, name  # evaluate@<row> needs models/<row>.pth
        assert set(row['budget']) <= made, row
    assert params['report']['baseline'] == 'student'


def test_zoo_teacher_stage_runs_in_one_process_offline(project, tmp_path):
    """The teacher stage of a `zoo:` entry, with `launch` at 8 processes: it does not
    relaunch, verifies the (here: pre-placed, fully pinned) file and exports tensors only.
    A zoo entry without a hash prefix in mmdet's index lets a made-up file stand in."""
    import hashlib
    import urllib.parse

    import torch

    from dfmsd.zoo import find_model
    zoo = find_model('ddq-detr-5scale_r50_8xb2-12e_coco')
    assert not zoo.sha256_prefix
    fake = tmp_path / Path(urllib.parse.urlparse(zoo.url).path).name
    torch.save({'state_dict': {'backbone.w': torch.ones(2, 3)}, 'meta': {'note': 'stand-in'}}, fake)
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    params_file = project / 'params.yaml'
    saved = params_file.read_text()
    p = yaml.safe_load(saved)
    p['teachers']['teacher_weak'] = {'zoo': zoo.name, 'sha256': digest, 'cache_dir': str(tmp_path)}
    params_file.write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        res = run([sys.executable, 'stages/train.py', 'teacher_weak'], project)
        ckpt = torch.load(project / 'models/teacher_weak.pth', weights_only=True)
        exported_cfg = (project / 'models/teacher_weak.py').read_text()
        log = (project / 'logs/teacher_weak.csv').read_text()
    finally:
        params_file.write_text(saved)
        for out in ('models/teacher_weak.pth', 'models/teacher_weak.py', 'logs/teacher_weak.csv'):
            (project / out).unlink(missing_ok=True)
    assert '[launch]' not in res.stdout and 'verified' in res.stdout
    assert torch.equal(ckpt['state_dict']['backbone.w'], torch.ones(2, 3))
    assert ckpt['meta']['zoo'] == zoo.name and ckpt['meta']['url'] == zoo.url
    assert 'DDQ' in exported_cfg
    assert log == 'iter,loss\n'


def test_data_stage_checks_the_layout_instead_of_generating(project):
    res = run([sys.executable, 'stages/data.py'], project)
    assert 'instances_train2017.json' in res.stdout
    assert not (project / 'data/synthetic').exists()
    val = project / 'data/coco/val2017'
    val.rename(val.with_name('val2017.moved'))
    try:
        res = run([sys.executable, 'stages/data.py'], project, check=False)
    finally:
        val.with_name('val2017.moved').rename(val)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert 'data/coco/val2017' in last and 'data.val_img' in last and 'docs/coco.md' in last


def test_dvc_parses_the_preset(project):
    listed = run(['dvc', 'stage', 'list'], project).stdout
    for stage in ('teacher@teacher_weak', 'teacher@teacher_strong', 'baseline', 'distill@mgd',
                  'distill@pkd', 'distill@dfmsd_stage1', 'distill_me@dfmsd_stage2', 'evaluate@dfmsd_stage2'):
        assert stage in listed
    run(['dvc', 'status'], project)
