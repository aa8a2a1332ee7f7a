"""The COCO presets (presets/coco*.yaml): the paper's tables as presets of the grid, checked on a CPU.

* every preset validates (schema and the mmdet-side checks), every zoo teacher resolves in the
  installed mmdet model index to a URL with a sha256 prefix, every student config exists, and
  the tables share coco's loss settings (no network);
* every (teacher, student) of every preset builds a StageDistiller from the configs with random
  weights, sharing at least one FPN stride;
* under the coco preset, DVC keeps the dataset out of its cache (the data stage's output);
* the stages of one SAL row and one single-stage row build and start on a CPU and run through
  evaluation, on a COCO-shaped sample (COCO 2017 layout and 80 categories, a handful of small
  images), with local teachers: the coco pair's zoo configs with random weights.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from support import REPO, copy_project, preset_params, run

from dfmsd.core.kinds import METHOD_GROUPS

PRESETS = sorted(p.stem for p in (REPO / 'presets').glob('coco*.yaml'))
ITERS_24_EPOCHS = 177430  # 118,287 train2017 images x 24 epochs / 16 per batch
#: COCO 2017's category ids (1-90 with gaps), in the order of mmdet's 80 class names
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def teachers(params: dict):
    """(pair, role, teacher entry) of every teacher of a merged preset."""
    for pair_name, pair in params['pairs'].items():
        for role in ('weak', 'strong'):
            yield pair_name, role, pair[role]


def all_methods(params: dict) -> dict[str, dict]:
    return {name: m for group in METHOD_GROUPS for name, m in params[group].items()}


# ---------------------------------------------------------------- (a) the presets themselves
@pytest.mark.fast
@pytest.mark.parametrize('name', PRESETS)
def test_preset_validates_with_mmdet_and_its_models_resolve(name, monkeypatch, capsys):
    from dfmsd.check import main
    from dfmsd.core.params import ZooTeacher, validate
    from dfmsd.engine.configs import resolve_config
    from dfmsd.engine.zoo import find_model

    monkeypatch.chdir(REPO)  # `python -m dfmsd.check --preset <name>`: schema, losses, config files
    assert main(['--preset', name]) == 0, capsys.readouterr().err
    merged = preset_params(name)
    params = validate(merged, name)
    for pair_name, role, _ in teachers(merged):
        teacher = getattr(params.pairs[pair_name], role)
        assert isinstance(teacher, ZooTeacher), f'{name}: pairs.{pair_name}.{role} is not a zoo teacher'
        model = find_model(teacher.zoo)
        assert model.name == teacher.zoo, f'{teacher.zoo} resolves to {model.name} (give the exact index name)'
        assert model.url.startswith('https://') and len(model.sha256_prefix) >= 8, model
        assert Path(model.config).is_file(), model
    for student_name, student in params.students.items():
        assert student.config.startswith('mmdet::'), f'{name}: students.{student_name}: use an mmdet:: reference'
        assert Path(resolve_config(student.config, f'students.{student_name}.config')).is_file()


@pytest.mark.fast
@pytest.mark.parametrize('name', PRESETS)
def test_preset_keeps_the_common_coco_settings(name):
    coco, p = preset_params('coco'), preset_params(name)
    assert p['report'].pop('preset') == name and coco['report'].pop('preset') == 'coco'  # each report names its own
    for key in ('data', 'train', 'launch', 'seeds', 'me', 'evaluate', 'report', 'distill', 'runtime'):
        assert p[key] == coco[key], f'{name} changes {key}: common to every COCO preset'
    assert p['figures']['method'] in p['sal_methods'] and p['figures']['pair'] in p['pairs']
    assert p['data']['generate'] is False and p['data']['image_size'] is None
    assert p['data']['splits']['test'] == p['data']['splits']['val']  # val2017, the paper's
    assert p['train']['iters'] == ITERS_24_EPOCHS and p['train']['lr'] is None
    assert p['train']['batch_size'] * p['launch']['nproc_per_node'] * p['launch']['nnodes'] == 16


@pytest.mark.fast
@pytest.mark.parametrize('name', [p for p in PRESETS if p != 'coco'])
def test_tables_reuse_coco_loss_settings(name):
    """A method named as one of coco's is coco's; every DFMSD row (full or ablation) uses coco's
    alpha, beta and gamma; so the tables cannot drift apart."""
    coco, p = all_methods(preset_params('coco')), all_methods(preset_params(name))
    dfmsd = coco['dfmsd']
    stage, sfa = dfmsd['losses']['stage'], dfmsd['losses']['sfa']
    assert stage['reduction'] == 'mean' and dfmsd['aug_loss_weight'] == stage['loss_weight'] / 2
    for method_name, method in p.items():
        if method_name in coco:
            assert method == coco[method_name], f'{name}: {method_name} differs from coco.yaml'
        if method_name == 'dfmsd' or method.get('ablation_of') == 'dfmsd':
            assert method['losses'].get('stage') == stage, f'{name}: {method_name}.losses.stage'
            assert method['losses'].get('sfa', sfa) == sfa, f'{name}: {method_name}.losses.sfa'
            assert method.get('aug_loss_weight', 0) in (0, dfmsd['aug_loss_weight']), method_name


# ---------------------------------------------------------------- (b) every model pair builds
@pytest.fixture(scope='module')
def coco_categories(tmp_path_factory):
    """A dfmsd Data whose train annotation file holds COCO's 80 categories (no images)."""
    from mmdet.datasets import CocoDataset

    from dfmsd.core.params import Data

    root = tmp_path_factory.mktemp('coco-categories')
    names = CocoDataset.METAINFO['classes']
    ann = root / 'annotations/instances_train2017.json'
    ann.parent.mkdir(parents=True)
    ann.write_text(
        json.dumps(
            {'images': [], 'annotations': [], 'categories': [{'id': i, 'name': n} for i, n in zip(COCO_IDS, names)]}
        )
    )
    split = {'ann': 'annotations/instances_train2017.json', 'img': 'train2017/'}
    return Data(root=str(root), generate=False, splits={'train': split, 'val': split, 'test': split})


def test_every_teacher_and_student_of_every_preset_build_a_stage_distiller(coco_categories, monkeypatch):
    """StageDistiller from the configs with random weights, levels matched by stride.

    Every (teacher, student) of every preset builds one, with each distinct loss of the methods
    that use that teacher (the weak one: the SAL methods'). To keep this quick on a CPU, each config
    is built and probed once (the distillers share the cached models: nothing runs forward here),
    and the probes run at 128 px, where strides up to 64 have 2 cells or more."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.core.params import Detector, validate
    from dfmsd.engine.configs import detector_config, point_at_dataset
    from dfmsd.engine.zoo import find_model
    from dfmsd.models import distiller

    init_default_scope('mmdet')
    torch.set_num_threads(2)
    real_build_teacher, real_probe, registry = distiller.build_teacher, distiller.probe_fpn, distiller.MODELS
    teachers_built: dict[str, torch.nn.Module] = {}  # zoo name -> frozen teacher
    students_built: dict[int, torch.nn.Module] = {}  # id(student model config) -> built student
    source: dict[int, object] = {}  # id(model) -> the config it was built from (cached probes)
    probes: dict[int, list] = {}

    def build_teacher(config, checkpoint):
        assert checkpoint is None
        if config not in teachers_built:
            cfg = Config.fromfile(find_model(config).config)
            point_at_dataset(cfg, coco_categories)  # as dfmsd.engine.teachers.import_teacher does
            teachers_built[config] = real_build_teacher(cfg, None)
            source[id(teachers_built[config])] = config
        return teachers_built[config]

    class Registry:  # the student from its cache; every other build (the losses) as usual
        def __getattr__(self, name):
            return getattr(registry, name)

        def build(self, cfg, *args, **kwargs):
            if id(cfg) not in students_built:
                return registry.build(cfg, *args, **kwargs)
            source[id(students_built[id(cfg)])] = cfg
            return students_built[id(cfg)]

    def probe(model, size):
        key = (id(source.get(id(model), model)), size)
        if key not in probes:
            probes[key] = real_probe(model, size)
        return probes[key]

    monkeypatch.setattr(distiller, 'build_teacher', build_teacher)
    monkeypatch.setattr(distiller, 'probe_fpn', probe)
    monkeypatch.setattr(distiller, 'MODELS', Registry())
    monkeypatch.setattr(distiller, 'STRIDE_PROBE', 128, raising=False)  # the size strides are read at
    student_cfgs: dict[str, dict] = {}
    built: dict[tuple, list[int]] = {}
    for name in PRESETS:
        params = validate(preset_params(name), name)
        for pair_name, pair in params.pairs.items():
            for role in ('weak', 'strong'):
                groups = ('sal_methods',) if role == 'weak' else METHOD_GROUPS
                configs = {
                    json.dumps(loss.model_dump(exclude_none=True), sort_keys=True)
                    for g in groups
                    for method in getattr(params, g).values()
                    for loss in method.losses.values()
                }
                if not configs:
                    continue
                losses = {f'loss{i}': json.loads(c) for i, c in enumerate(sorted(configs))}  # each distinct loss once
                zoo = getattr(pair, role).zoo
                for student_name, student in params.students.items():
                    if student.config not in student_cfgs:
                        spec = Detector(config=student.config, pretrained=False)
                        cfg = detector_config(spec, coco_categories, f'students.{student_name}').model
                        student_cfgs[student.config] = cfg
                        students_built[id(cfg)] = registry.build(cfg)
                    key = (zoo, student.config, json.dumps(losses, sort_keys=True))
                    if key in built:
                        continue
                    model = distiller.StageDistiller(
                        student=student_cfgs[student.config],
                        teacher=dict(config=zoo, checkpoint=None),
                        losses=losses,
                        probe_size=128,
                        min_cells=2,
                    )
                    built[key] = [p['stride'] for p in model.level_pairs]
                    assert built[key], f'{name}: pairs.{pair_name}.{role} x {student_name}: no shared FPN level'
    # heterogeneous pairs share strides 8-64 (two-stage teachers have P2-P6, dense students P3-P7)
    assert all(len(strides) >= 4 and {8, 16, 32, 64} <= set(strides) for strides in built.values()), built


# ---------------------------------------------------------------- a COCO-shaped sample
def write_coco_sample(root: Path, *, train: int = 4, val: int = 2, seed: int = 0) -> None:
    """COCO 2017's layout and categories with a few small JPEG images: boxes with polygon
    masks, one training image without boxes (COCO has 1,021)."""
    from mmdet.datasets import CocoDataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    categories = [
        {'supercategory': 'thing', 'id': i, 'name': n} for i, n in zip(COCO_IDS, CocoDataset.METAINFO['classes'])
    ]
    ann_id = 1
    for split, count in (('train2017', train), ('val2017', val)):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for k in range(count):
            image_id = 1000 * (split == 'val2017') + k + 1
            w, h = (160, 120) if k % 2 == 0 else (120, 160)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            boxes = [] if (split == 'train2017' and k == count - 1) else range(int(rng.integers(1, 4)))
            for _ in boxes:
                bw, bh = int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                pixels[y : y + bh, x : x + bw] = rng.integers(0, 256, size=3, dtype=np.uint8)
                annotations.append(
                    {
                        'id': ann_id,
                        'image_id': image_id,
                        'category_id': int(rng.choice(COCO_IDS)),
                        'bbox': [x, y, bw, bh],
                        'area': bw * bh,
                        'iscrowd': 0,
                        'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
                    }
                )
                ann_id += 1
            file_name = f'{image_id:012d}.jpg'
            Image.fromarray(pixels).save(root / split / file_name, quality=90)
            images.append({'id': image_id, 'file_name': file_name, 'width': w, 'height': h})
        ann = root / f'annotations/instances_{split}.json'
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(
            json.dumps(
                {
                    'info': {'description': 'COCO-shaped sample'},
                    'licenses': [],
                    'images': images,
                    'annotations': annotations,
                    'categories': categories,
                }
            )
        )


# ---------------------------------------------------------------- (c) the dataset stays out of DVC's cache
def test_dvc_keeps_the_coco_dataset_out_of_its_cache(tmp_path):
    """The coco preset's data stage on a COCO-shaped sample linked in as docs/coco.md says."""
    params = preset_params('coco')
    root = copy_project(tmp_path / 'project', params=params)
    data = root / params['data']['root']
    write_coco_sample(tmp_path / 'datasets/coco')
    data.parent.mkdir(parents=True, exist_ok=True)
    data.symlink_to(tmp_path / 'datasets/coco')
    stages = run([sys.executable, '-m', 'dvc', 'stage', 'list'], root).stdout
    data_line = next(line for line in stages.splitlines() if line.split()[0] == 'data')
    assert params['data']['root'] in data_line.replace(',', ' ').split()
    before = sorted(str(p.relative_to(data)) for p in data.rglob('*'))
    assert 'val2017/000000001001.jpg' in before
    run([sys.executable, '-m', 'dvc', 'repro', '--single-item', 'data'], root)
    # persist: the stage did not delete the dataset before running; cache: false: nothing copied
    assert data.is_symlink() and sorted(str(p.relative_to(data)) for p in data.rglob('*')) == before
    cached = [p for p in (root / '.dvc/cache').rglob('*') if p.is_file()]
    assert not cached, f'DVC cached {len(cached)} files of the dataset'
    lock = yaml.safe_load((root / 'dvc.lock').read_text())['stages']['data']
    # hashed and recorded, not cached; the other stages depend on the splits' digests instead
    assert [o['path'] for o in lock['outs']] == [params['data']['root'], 'data/dataset.json']
    manifest = json.loads((root / 'data/dataset.json').read_text())
    assert manifest['val']['images'] == len(
        json.loads((data / params['data']['splits']['val']['ann']).read_text())['images']
    )
    status = run([sys.executable, '-m', 'dvc', 'status', 'data'], root).stdout
    assert 'up to date' in status


# ---------------------------------------------------------------- (d) the stages start on a CPU
def local_teacher(zoo: str, out: Path) -> dict:
    """The zoo config with random weights, exported as a plain checkpoint: a local teacher."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from dfmsd.core.io import sha256_file
    from dfmsd.engine.checkpoint import export_plain_checkpoint
    from dfmsd.engine.zoo import find_model, mim_dir

    init_default_scope('mmdet')
    config = find_model(zoo).config
    model = MODELS.build(Config.fromfile(config).model)  # PyTorch's default init: no download
    export_plain_checkpoint(model.state_dict(), out)
    return {
        'config': 'mmdet::' + str(Path(config).relative_to(mim_dir() / 'configs')),
        'checkpoint': str(out),
        'sha256': sha256_file(out),
    }


def test_sal_and_single_stage_rows_run_on_a_cpu_through_evaluation(tmp_path):
    """The coco preset, changed only where a CPU needs it: small images, 2 iterations of 1 image,
    one gloo process, no pretrained downloads, local random-weight copies of the zoo teachers; and
    ME's noise always on (random teachers find no boxes, so every image takes the noise branch),
    so that SAL stage 2's single image surely has its enhanced view."""
    import torch

    params = preset_params('coco')
    params['data']['image_size'] = 128
    params['train'].update(iters=2, batch_size=1, checkpoint_interval=1)
    params['launch'].update(nproc_per_node=1, backend='gloo')
    params['me']['noise_prob'] = 1.0
    torch.manual_seed(0)
    for pair_name, role, spec in list(teachers(params)):
        params['pairs'][pair_name][role] = local_teacher(spec['zoo'], tmp_path / f'{pair_name}-{role}.pth')
    for student in params['students'].values():
        student['pretrained'] = False
    root = copy_project(tmp_path / 'project', params=params)
    # outputs hard-linked to the DVC cache, not copied: the Swin checkpoints come to 1.5 GB a copy
    run([sys.executable, '-m', 'dvc', 'config', '--local', 'cache.type', 'hardlink,copy'], root)
    write_coco_sample(root / params['data']['root'])
    pair, student = next(iter(params['pairs'])), next(iter(params['students']))
    rows = {'sal': ('evaluate_sal', 'dfmsd'), 'single': ('evaluate', next(iter(params['methods'])))}
    targets = [f'{stage}@{student}-{pair}-{method}-0' for stage, method in rows.values()]
    res = run([sys.executable, '-m', 'dvc', 'repro', *targets], root, timeout=600)
    for _, method in rows.values():
        rel = f'students/{student}/seed0/{pair}/{method}'
        record = json.loads((root / f'metrics/{rel}.json').read_text())
        assert set(record['test']) >= {'mAP'} and all(math.isfinite(v) for v in record['test'].values())
        assert record['iters'] == 2 and record['strides'] == [8, 16, 32, 64], record  # Swin: P2-P6; 128 px
        log = list(csv.DictReader((root / f'logs/{rel}.csv').open()))
        assert log and all(
            math.isfinite(float(v))
            for row in log
            for k, v in row.items()
            if k.startswith('loss') and v not in ('', None)
        ), log
        assert any(k.startswith('loss_distill') for k in log[0]), log[0].keys()
    header = (root / f'logs/students/{student}/seed0/{pair}/dfmsd.csv').read_text().splitlines()[0]
    assert 'loss_distill_aug_s8' in header and 'loss_distill_sfa_s8' in header, header  # ME views and SFA
    stage1 = json.loads((root / f'models/students/{student}/seed0/{pair}/dfmsd.stage1/run.json').read_text())
    final = json.loads((root / f'metrics/students/{student}/seed0/{pair}/dfmsd.json').read_text())
    assert stage1['iters'] == 1 and stage1['views_seen'] == 0 and final['views_seen'] == 1, (stage1, final)
    assert 'swin' in (root / f'models/teachers/{pair}/strong/model.py').read_text()
    assert 'failed' not in res.stdout.lower()
