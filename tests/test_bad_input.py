"""Bad input through the real entry points: one clear error line naming the key or the file,
the project's exit code (2), no traceback, and no output written, lost or left partial.

* params: `make check` (what `make repro` and `make flow` run before DVC touches anything)
  on a copy of the project with the smoke preset's params;
* `make repro` with a configuration error in a stage that has outputs: they stay; the same
  error reached through `dvc repro` by hand loses them, and docs/reviewing.md's recipe
  (`dvc checkout <stage>`, `git checkout -- <logs>`) brings them back;
* a damaged teacher checkpoint, under `dvc repro`;
* a user's own teacher (an unknown zoo name; a local checkpoint missing, with another hash, or
  not loadable): `make check` names the key, and so does the teacher stage run by hand;
* a bad dataset (`data.generate: false`), under a plain `dvc repro`: the data stage fails
  naming the file and no training stage runs; an empty train split is caught by `make check`
  already, which the flow (`make repro`) runs before any stage.

The stages that need a trained teacher get a stand-in: plain weights recorded as the weak
teacher's output with `dvc commit`, so that nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support import copy_project, preset_params, run, set_key

pytestmark = pytest.mark.timeout(600)

TEACHER = 'models/teachers/tiny/weak'  # the smoke preset's weak teacher
TEACHER_LOG = 'logs/teachers/tiny/weak.csv'
GIT = ['git', '-c', 'user.email=test@dfmsd', '-c', 'user.name=test']


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the project (but git's and DVC's own bookkeeping) and its SHA-256."""
    skip = ('.git/', '.dvc/tmp/')
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(skip) and '__pycache__' not in p.parts
    }


def edit_params(root: Path, fn: Callable[[dict], object]) -> None:
    params = yaml.safe_load((root / 'params.yaml').read_text())
    fn(params)
    (root / 'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))


def make(root: Path, *args: str):
    """``make <args>`` in ``root`` with this interpreter, its venv set-up skipped (``-o setup``)."""
    return run(['make', '-o', 'setup', *args, f'PY={sys.executable}'], root, check=False, timeout=300)


def dvc(root: Path, *args: str, check: bool = True):
    return run([sys.executable, '-m', 'dvc', *args], root, check=check, timeout=300)


def assert_clean_error(res, *needles: str, code: int = 2) -> str:
    """The run failed with ``code`` and one ``error [...]`` line holding every needle; no traceback."""
    out = res.stdout + res.stderr
    assert res.returncode == code, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
    assert 'weights_only=False' not in out
    # a stage's own line, or the same line in the flow's log (`<time> | INFO | Task run 'x' - error [...`)
    errors = [line[line.index('error [') :].strip() for line in out.splitlines() if 'error [' in line]
    assert any(all(n in line for n in needles) for line in errors), f'{needles} not in one of {errors}'
    return next(line for line in errors if all(n in line for n in needles))


# ---------------------------------------------------------------- params: `make check`
@pytest.fixture(scope='module')
def project_master(tmp_path_factory):
    """The project with the smoke preset's params (no outputs), copied by each test."""
    return copy_project(tmp_path_factory.mktemp('bad-params') / 'project', params=preset_params('smoke'))


PARAM_CASES = [
    pytest.param(
        set_key('train.iters', 0),
        [],
        ['train.iters', 'greater than 0', '(got 0)'],
        id='iters-zero',
        marks=pytest.mark.fast,
    ),
    pytest.param(
        set_key('train.iters', -5),
        [],
        ['train.iters', 'greater than 0', '(got -5)'],
        id='iters-negative',
        marks=pytest.mark.fast,
    ),
    pytest.param(
        set_key('train.batch_size', 0),
        [],
        ['train.batch_size', 'greater than 0'],
        id='batch-size-zero',
        marks=pytest.mark.fast,
    ),
    pytest.param(
        set_key('train.lr', 'fast'),
        [],
        ['train.lr', 'valid number', "'fast'"],
        id='lr-not-a-number',
        marks=pytest.mark.fast,
    ),
    pytest.param(
        set_key('sal_methods.dfmsd.ablation_of', 'dfmsd_v2'),
        [],
        ['sal_methods.dfmsd.ablation_of', "no method 'dfmsd_v2'", 'known: ', 'dfmsd_no_sal'],
        id='unknown-ablation-of',
        marks=pytest.mark.fast,
    ),
    pytest.param(None, ['PRESET=nope'], ["no preset 'nope'", 'smoke'], id='unknown-preset', marks=pytest.mark.fast),
    pytest.param(
        set_key('methods.fkd.losses.feature.type', 'FeatureKDLos'),
        [],
        ['methods.fkd.losses.feature.type', "unknown loss 'FeatureKDLos'", 'FeatureKDLoss'],
        id='unknown-loss-type',
    ),
    pytest.param(
        set_key('methods.fkd.losses.feature.temperature', 2.0),
        [],
        ['methods.fkd.losses.feature', 'FBKDLoss takes no temperature', 'it takes: ', 'loss_weight', 'spatial_T'],
        id='unknown-loss-argument',
    ),
    pytest.param(
        set_key('students.retinanet.config', 'configs/small/retinanet_v2.py'),
        [],
        ['students.retinanet.config', 'configs/small/retinanet_v2.py does not exist'],
        id='unknown-config-path',
    ),
    pytest.param(
        set_key('pairs.tiny.strong', {'zoo': 'nonsense'}),
        [],
        ['params.yaml: pairs.tiny.strong.zoo', "unknown mmdet model zoo entry 'nonsense'"],
        id='unknown-zoo-teacher',
    ),
    pytest.param(
        set_key('pairs.tiny.strong', {'zoo': 'gfl_r50_fpn_1x_cooc'}),
        [],
        ['params.yaml: pairs.tiny.strong.zoo', "'gfl_r50_fpn_1x_cooc'", 'close matches: ', 'gfl_r50_fpn_1x_coco'],
        id='misspelt-zoo-teacher',
    ),
    pytest.param(
        set_key(
            'pairs.tiny.weak', {'config': 'configs/small/faster_rcnn.py', 'checkpoint': 'mine.pth', 'sha256': 'a' * 64}
        ),
        [],
        ['params.yaml: pairs.tiny.weak.checkpoint', 'mine.pth does not exist', 'your own file'],
        id='missing-local-checkpoint',
    ),
    pytest.param(
        set_key('pairs.tiny.strong', {'zoo': 'gfl_r50_fpn_1x_coco', 'sha256': 0}),  # YAML: sha256: 000...0
        [],
        ['params.yaml: pairs.tiny.strong.sha256', 'reads as a number in YAML', "quote it (sha256: '"],
        id='unquoted-digit-sha256',
        marks=pytest.mark.fast,
    ),
]


@pytest.mark.parametrize(('edit', 'make_vars', 'needles'), PARAM_CASES)
def test_make_check_names_the_key_and_writes_nothing(project_master, tmp_path, edit, make_vars, needles):
    root = shutil.copytree(project_master, tmp_path / 'project', symlinks=True)
    if edit:
        edit_params(root, edit)
    before = snapshot(root)
    res = make(root, 'check', *make_vars)
    line = assert_clean_error(res, *needles)
    assert line.startswith('error [params]: ')
    assert 'dvc repro' not in line  # a params error is fixed in params (or the user's files), not by a rerun
    assert 'Error 2' in res.stderr  # make: the check itself exited with 2
    assert snapshot(root) == before


def assert_check_fails(root: Path, *needles: str, make_vars: tuple[str, ...] = ()) -> str:
    """`make check` exits with 2 on one line holding every needle, and writes nothing."""
    before = snapshot(root)
    res = make(root, 'check', *make_vars)
    line = assert_clean_error(res, 'error [params]: ', *needles)
    assert 'Error 2' in res.stderr
    assert snapshot(root) == before
    return line


@pytest.mark.fast
def test_a_preset_extending_a_missing_one_names_the_file_that_says_so(project_master, tmp_path):
    root = shutil.copytree(project_master, tmp_path / 'project', symlinks=True)
    (root / 'presets/mine.yaml').write_text('extends: smoek\nseeds: [0]\n')
    assert_check_fails(
        root, "presets/mine.yaml: extends: no preset 'smoek'", 'known: ', 'smoke', make_vars=('PRESET=mine',)
    )


GARBAGE = bytes(range(256)) * 16


def local_teacher(root: Path, content: bytes, sha256: str | None = None, role: str = 'strong') -> None:
    """The pair's ``role`` teacher becomes a local checkpoint ``mine.pth`` holding ``content``."""
    (root / 'mine.pth').write_bytes(content)
    entry = {'config': 'configs/small/gfl.py', 'checkpoint': 'mine.pth'}
    edit_params(root, set_key(f'pairs.tiny.{role}', {**entry, 'sha256': sha256 or hashlib.sha256(content).hexdigest()}))


def test_make_check_refuses_a_local_checkpoint_that_does_not_load(project_master, tmp_path):
    root = shutil.copytree(project_master, tmp_path / 'project', symlinks=True)
    local_teacher(root, GARBAGE)  # its true sha256: the hash cannot tell, only loading can
    line = assert_check_fails(root, 'params.yaml: pairs.tiny.strong.checkpoint', 'mine.pth', 'cannot be loaded')
    assert 'pairs.tiny.strong.sha256' in line and 'dvc ' not in line


def test_make_check_refuses_a_local_checkpoint_with_another_hash(project_master, tmp_path):
    root = shutil.copytree(project_master, tmp_path / 'project', symlinks=True)
    local_teacher(root, GARBAGE, sha256='b' * 64)
    actual = hashlib.sha256(GARBAGE).hexdigest()
    line = assert_check_fails(root, 'params.yaml: pairs.tiny.strong.sha256', 'mine.pth', actual, 'b' * 64)
    assert "set pairs.tiny.strong.sha256: '" in line and 'replace the file' in line and 'dvc ' not in line


# ---------------------------------------------------------------- a project with outputs
@pytest.fixture(scope='module')
def built_master(tmp_path_factory):
    """The smoke project with its data stage run and a stand-in weak teacher recorded, committed."""
    root = copy_project(tmp_path_factory.mktemp('built') / 'project', params=preset_params('smoke'))
    dvc(root, 'repro', '--single-item', 'data')
    import torch

    (root / TEACHER).mkdir(parents=True)
    torch.save(
        {'state_dict': {'w': torch.arange(6.0)}, 'meta': {'dataset_meta': {'classes': ['a']}}},
        root / TEACHER / 'model.pth',
    )
    (root / TEACHER / 'model.py').write_text('# stand-in config: no stage here gets as far as reading it\n')
    (root / TEACHER_LOG).parent.mkdir(parents=True)
    (root / TEACHER_LOG).write_text('iter,loss\n1,1.0\n')
    dvc(root, 'commit', '--force', 'teacher@tiny-weak')
    run(GIT + ['add', '-A'], root)
    run(GIT + ['commit', '-qm', 'data and the weak teacher'], root)
    return root


@pytest.fixture
def built(built_master, tmp_path):
    return shutil.copytree(built_master, tmp_path / 'project', symlinks=True)


def test_make_repro_fails_before_dvc_touches_outputs_and_dvc_checkout_restores_them(built):
    original = snapshot(built)
    edit_params(built, set_key('pairs.tiny.weak.config', 'configs/small/nope.py'))
    before = snapshot(built)
    res = make(built, 'repro', 'JOBS=1')
    assert_clean_error(res, 'error [params]: ', 'pairs.tiny.weak.config', 'configs/small/nope.py does not exist')
    assert 'Error 2' in res.stderr and 'Starting temporary server' not in res.stdout + res.stderr  # stopped at `check`
    assert snapshot(built) == before  # the teacher's model, its git-tracked log, dvc.lock: untouched

    # the same error reached by hand: DVC removes the stage's outputs before its command fails...
    res = dvc(built, 'repro', '--single-item', 'teacher@tiny-weak', check=False)
    assert_clean_error(res, 'error [teacher@tiny-weak]: ', 'pairs.tiny.weak.config', code=255)
    assert not (built / TEACHER).exists() and not (built / TEACHER_LOG).exists()
    # ...and docs/reviewing.md's recipe brings them back
    run(GIT + ['checkout', '--', 'params.yaml'], built)
    dvc(built, 'checkout', 'teacher@tiny-weak')
    run(GIT + ['checkout', '--', TEACHER_LOG], built)
    assert snapshot(built) == original
    assert json.loads(dvc(built, 'status', '--json', 'teacher@tiny-weak').stdout) == {}


def test_a_damaged_teacher_checkpoint_is_named_with_how_to_restore_it(built):
    weights = built / TEACHER / 'model.pth'
    good = weights.read_bytes()
    weights.write_bytes(bytes(range(256)) * 16)  # garbage bytes
    before = snapshot(built)
    res = dvc(built, 'repro', '--single-item', 'teacher_boxes@tiny', check=False)
    line = assert_clean_error(
        res,
        'error [teacher_boxes@tiny]: ',
        f'{TEACHER}/model.pth',
        f'dvc checkout --force {TEACHER}/model.pth',
        code=255,
    )
    assert 'cannot be loaded as model weights' in line
    assert 'exited with 2' in res.stderr
    assert not (built / 'data/me').exists()  # nothing partial
    assert snapshot(built) == before
    dvc(built, 'checkout', '--force', f'{TEACHER}/model.pth')  # what the message says
    assert weights.read_bytes() == good


def _truncate_json(root: Path) -> str:
    ann = root / 'data/synthetic/annotations/instances_val.json'
    ann.write_text(ann.read_text()[:300])
    return 'data/synthetic/annotations/instances_val.json: not valid JSON'


def _undecodable_image(root: Path) -> str:
    image = sorted((root / 'data/synthetic/test').iterdir())[2]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # a cut-off download
    return f'data/synthetic/test/{image.name} is not a readable image'


def _box_outside(root: Path) -> str:
    ann_file = root / 'data/synthetic/annotations/instances_test.json'
    ann = json.loads(ann_file.read_text())
    image = {im['id']: im for im in ann['images']}[ann['annotations'][0]['image_id']]
    ann['annotations'][0]['bbox'] = [image['width'] - 10.0, 5.0, 30.0, 20.0]
    ann_file.write_text(json.dumps(ann))
    return f'annotation {ann["annotations"][0]["id"]}: bbox [{image["width"] - 10.0}, 5.0, 30.0, 20.0] lies outside'


def run_up_to_teacher_boxes(root: Path):
    """Plain ``dvc repro`` of the stages up to the teacher boxes (data, teachers), one at a time:
    the data stage's own checks, where no ``make check`` ran first (the flow runs it)."""
    return run([sys.executable, '-m', 'dvc', 'repro', 'teacher_boxes@tiny'], root, check=False, timeout=300)


def flow_up_to_teacher_boxes(root: Path):
    """The flow (``make repro``) on the same stages: it checks the params first."""
    cmd = [sys.executable, '-m', 'flows', '--no-experiment', '--jobs', '1', '--target', 'teacher_boxes@tiny']
    return run(cmd, root, check=False, timeout=300)


@pytest.mark.parametrize(
    'damage',
    [_truncate_json, _undecodable_image, _box_outside],
    ids=['corrupt-annotation-json', 'image-does-not-decode', 'box-outside-its-image'],
)
def test_a_bad_dataset_stops_the_data_stage_before_any_training(built, damage):
    edit_params(built, set_key('data.generate', False))  # a dataset in place: checked, never regenerated
    needle = damage(built)
    before = snapshot(built)
    res = run_up_to_teacher_boxes(built)
    assert_clean_error(res, 'error [data]: ', needle, code=255)  # DVC's status for a failed stage
    assert "failed to reproduce 'data'" in res.stderr and "Running stage 'teacher@" not in res.stdout
    assert snapshot(built) == before  # the dataset (persist), the teacher, dvc.lock: as they were


@pytest.mark.parametrize(
    'edit, needles',
    [
        (set_key('pairs.tiny.strong', {'zoo': 'nonsense'}), ['pairs.tiny.strong.zoo', "entry 'nonsense'"]),
        (
            set_key('pairs.tiny.strong.checkpoint', 'absent.pth'),
            ['pairs.tiny.strong.checkpoint', 'absent.pth', 'own file'],
        ),
        (set_key('pairs.tiny.strong.sha256', 'b' * 64), ['pairs.tiny.strong.sha256', 'mine.pth', 'b' * 64]),
        (None, ['pairs.tiny.strong.checkpoint', 'mine.pth', 'cannot be loaded']),  # garbage with its true hash
    ],
    ids=['unknown-zoo-teacher', 'missing-local-checkpoint', 'local-checkpoint-with-another-hash', 'garbage-checkpoint'],
)
def test_the_teacher_stage_run_by_hand_names_the_key_of_a_bad_teacher(built, edit, needles):
    """`dvc repro` without `make check` first: the stage stops on the same errors, one line each."""
    local_teacher(built, GARBAGE)
    if edit:
        edit_params(built, edit)
    before = snapshot(built)
    res = dvc(built, 'repro', '--single-item', 'teacher@tiny-strong', check=False)
    line = assert_clean_error(res, 'error [teacher@tiny-strong]: ', *needles, code=255)
    assert 'dvc repro' not in line and 'exited with 2' in res.stderr
    assert snapshot(built) == before


def _empty_train_split(root: Path) -> None:
    ann_file = root / 'data/synthetic/annotations/instances_train.json'
    ann = json.loads(ann_file.read_text())
    ann_file.write_text(json.dumps({**ann, 'images': [], 'annotations': []}))  # valid COCO, nothing in it


def _unannotated_train_split(root: Path) -> None:
    ann_file = root / 'data/synthetic/annotations/instances_train.json'
    ann_file.write_text(json.dumps({**json.loads(ann_file.read_text()), 'annotations': []}))


@pytest.mark.parametrize(
    'damage, needle',
    [(_empty_train_split, 'split train has no images'), (_unannotated_train_split, 'split train has no annotations')],
    ids=['no-images', 'no-boxes'],
)
def test_an_empty_train_split_stops_make_check_and_the_data_stage(built, damage, needle):
    edit_params(built, set_key('data.generate', False))
    damage(built)
    ann = 'data/synthetic/annotations/instances_train.json'
    assert_check_fails(built, 'params.yaml: data.splits.train.ann', ann, needle)
    before = snapshot(built)
    res = run_up_to_teacher_boxes(built)
    assert_clean_error(res, 'error [data]: ', ann, needle, code=255)
    assert "Running stage 'teacher@" not in res.stdout
    flow = flow_up_to_teacher_boxes(built)  # make repro: stopped by the check, before any stage
    assert_clean_error(flow, 'error [params]: ', ann, needle, code=2)
    assert "Running stage '" not in flow.stdout + flow.stderr
    assert snapshot(built) == before  # data/dataset.json (the manifest) as it was
