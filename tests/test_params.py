"""params.yaml's schema (dfmsd.core.params): each error names the key path and the allowed or
offending value; the command-line check; how a stage reads its params."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable

import pytest
import yaml
from support import REPO, copy_project, env, set_key

from dfmsd.core.errors import EXIT_CODE, ParamsError
from dfmsd.core.params import SALMethod, StageParams, lookup, read_yaml, stage_params, teacher, validate

PAIR, STUDENT = 'rn18_gfl34', 'retinanet'  # names in the repository's params.yaml


def repository_params() -> dict:
    """A fresh copy of the repository's params.yaml, free to change."""
    params = read_yaml(REPO / 'params.yaml')
    assert PAIR in params['pairs'] and STUDENT in params['students']
    assert 'mgd' in params['methods'] and 'dfmsd_no_sal' in params['me_methods'] and 'dfmsd' in params['sal_methods']
    return params


def rename(group: str, old: str, new: str) -> Callable[[dict], None]:
    return lambda p: p[group].update({new: p[group].pop(old)})


# (change, what the error must name): the key path first, then the allowed or offending value(s)
CASES = {
    'iters zero': (set_key('train.iters', 0), ['train.iters', 'got 0']),
    'iters negative': (set_key('train.iters', -5), ['train.iters', 'got -5']),
    'batch size zero': (set_key('train.batch_size', 0), ['train.batch_size', 'got 0']),
    'lr not a number': (set_key('train.lr', 'fast'), ['train.lr', "got 'fast'"]),
    'unknown top-level key': (set_key('optimiser', {'type': 'SGD'}), ['optimiser', 'not permitted']),
    'unknown key in a method': (set_key('methods.mgd.lambda_mgd', 0.65), ['methods.mgd.lambda_mgd', 'got 0.65']),
    'teacher of no known kind': (
        set_key(f'pairs.{PAIR}.weak', {'url': 'https://example.org/t.pth'}),
        [f'pairs.{PAIR}.weak', 'url', 'config + iters', 'zoo', 'checkpoint'],
    ),
    'zoo teacher with a short sha256': (
        set_key(f'pairs.{PAIR}.strong', {'zoo': 'retinanet_r50_fpn_1x_coco', 'sha256': 'abc'}),
        [f'pairs.{PAIR}.strong.sha256', "got 'abc'"],
    ),
    'zoo teacher with an unquoted all-digit sha256': (
        set_key(f'pairs.{PAIR}.strong', {'zoo': 'retinanet_r50_fpn_1x_coco', 'sha256': 0}),
        [f'pairs.{PAIR}.strong.sha256', 'reads as a number in YAML', "quote it (sha256: '"],
    ),
    'local teacher with an unquoted all-digit sha256': (
        set_key(f'pairs.{PAIR}.weak', {'config': 'c.py', 'checkpoint': 't.pth', 'sha256': 1234}),
        [f'pairs.{PAIR}.weak.sha256', 'reads as a number in YAML', "quote it (sha256: '"],
    ),
    'missing split': (lambda p: p['data']['splits'].pop('val'), ['data.splits', 'val']),
    'unknown split': (
        set_key('data.splits.holdout', {'ann': 'h.json', 'img': 'h/'}),
        ['data.splits.holdout', 'train', 'val', 'test'],
    ),
    'sal me_stages 3': (set_key('sal_methods.dfmsd.me_stages', [3]), ['sal_methods.dfmsd.me_stages', 'got 3']),
    'aug weight without ME views': (
        set_key('methods.mgd.aug_loss_weight', 0.25),
        ['methods.mgd.aug_loss_weight', '0.25', 'ME views'],
    ),
    'aug weight with no SAL ME stage': (
        set_key('sal_methods.dfmsd.me_stages', []),
        ['sal_methods.dfmsd.aug_loss_weight', 'me_stages'],
    ),
    'ME views without aug weight': (
        set_key('me_methods.dfmsd_no_sal.aug_loss_weight', 0),
        ['me_methods.dfmsd_no_sal.aug_loss_weight', '0', 'ME views'],
    ),
    'ablation of no method': (
        set_key('me_methods.dfmsd_no_sal.ablation_of', 'dfmsd2'),
        ['me_methods.dfmsd_no_sal.ablation_of', "'dfmsd2'", 'dfmsd, '],
    ),
    'a name in two groups': (
        lambda p: p['sal_methods'].update(mgd=p['sal_methods']['dfmsd']),
        ['methods.mgd', 'sal_methods.mgd'],
    ),
    'a dash in a name': (rename('methods', 'mgd', 'mgd-v2'), ['methods.mgd-v2', 'must match']),
    'an @ in a name': (rename('students', STUDENT, 'retina@18'), ['students.retina@18', 'must match']),
    'duplicate seeds': (set_key('seeds', [0, 1, 0]), ['seeds', '[0, 1, 0]']),
    'crop range reversed': (lambda p: p['me'].update(crop_min=0.4, crop_max=0.2), ['me', '0.4', '0.2']),
    'widths half given': (
        lambda p: p['students'][STUDENT].pop('width'),
        [f'students.{STUDENT}', 'depth, width and fpn_channels'],
    ),
}


@pytest.mark.fast
@pytest.mark.parametrize('case', CASES)
def test_each_error_names_the_key_path_and_the_value(case):
    change, needles = CASES[case]
    params = repository_params()
    change(params)
    with pytest.raises(ParamsError) as err:
        validate(params, 'mine.yaml')
    message = str(err.value)
    assert all(line.startswith('mine.yaml: ') for line in message.splitlines()), message
    assert '(top)' not in message and 'Value error' not in message, message
    path, *values = needles
    assert f'mine.yaml: {path}' in message, message
    for value in values:
        assert value in message, message


@pytest.mark.fast
def test_every_problem_gets_its_own_line():
    params = repository_params()
    params['train'].update(iters=0, batch_size=0)
    params['optimiser'] = {}
    with pytest.raises(ParamsError) as err:
        validate(params)
    lines = str(err.value).splitlines()
    assert sorted(line.split(': ')[1] for line in lines) == ['optimiser', 'train.batch_size', 'train.iters']


@pytest.mark.fast
@pytest.mark.parametrize(
    'entry, needles',
    [
        ({'iters': 10}, ['no known teacher kind', 'iters']),
        ('retinanet', ['no known teacher kind', "'retinanet'"]),
        ({'config': 'configs/small/gfl.py'}, ['pairs.p.weak.iters']),
        ({'config': 'c.py', 'checkpoint': 't.pth'}, ['pairs.p.weak.sha256']),
    ],
)
def test_a_stage_reading_one_teacher_gets_the_same_key_paths(entry, needles):
    with pytest.raises(ParamsError) as err:
        StageParams({'pairs': {'p': {'weak': entry}}}).teacher('p', 'weak')
    message = str(err.value)
    assert message.startswith('params.yaml: pairs.p.weak'), message
    for needle in needles:
        assert needle in message, message


@pytest.mark.fast
def test_the_teacher_kind_follows_its_keys():
    digest = '0' * 64
    kinds = {
        'trained': {'config': 'configs/small/gfl.py', 'iters': 10},
        'zoo': {'zoo': 'gfl_r50_fpn_1x_coco'},
        'local': {'config': 'c.py', 'checkpoint': 't.pth', 'sha256': digest},
    }
    assert {kind: type(teacher(entry, 'x')).__name__ for kind, entry in kinds.items()} == {
        'trained': 'TrainedTeacher',
        'zoo': 'ZooTeacher',
        'local': 'LocalTeacher',
    }


# ---------------------------------------------------------------- the command line


def check(params_file: str, cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'dfmsd.check', params_file, *args],
        cwd=cwd,
        env=env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.fast
def test_command_on_a_broken_file_prints_one_error_line_per_problem(tmp_path):
    params = repository_params()
    params['train']['iters'] = 0
    params['sal_methods']['dfmsd']['me_stages'] = [3]
    (tmp_path / 'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    res = check('params.yaml', tmp_path)
    assert res.returncode == EXIT_CODE, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith('error [params]: params.yaml: ') for line in lines), res.stderr
    assert 'train.iters' in res.stderr and 'sal_methods.dfmsd.me_stages' in res.stderr
    assert 'Traceback' not in res.stderr and res.stdout == ''


@pytest.mark.fast
@pytest.mark.parametrize(
    'text, needle', [('train: [unclosed', 'not valid YAML'), ('- a list', 'mapping'), (None, 'not found')]
)
def test_command_on_an_unreadable_file(tmp_path, text, needle):
    if text is not None:
        (tmp_path / 'params.yaml').write_text(text)
    res = check('params.yaml', tmp_path)
    assert res.returncode == EXIT_CODE
    assert res.stderr.startswith('error [params]: params.yaml') and needle in res.stderr, res.stderr
    assert 'Traceback' not in res.stderr


def test_command_accepts_the_repository_params():
    res = check('params.yaml', REPO)  # reads only
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith('[params] params.yaml: valid')


# ---------------------------------------------------------------- deep checks (mmdet)


@pytest.fixture
def buildable(monkeypatch):
    """check_buildable in the repository (config paths are relative to it), mmdet loaded."""
    from dfmsd.check import check_buildable

    monkeypatch.chdir(REPO)
    return lambda params: check_buildable(validate(params))


@pytest.mark.parametrize(
    'change, needles',
    [
        (
            set_key(f'students.{STUDENT}.config', 'configs/small/yolo.py'),
            [f'students.{STUDENT}.config', 'configs/small/yolo.py'],
        ),
        (
            set_key(f'pairs.{PAIR}.strong.config', 'mmdet::gfl/gfl_r50_fpn_9x_coco.py'),
            [f'pairs.{PAIR}.strong.config', 'gfl_r50_fpn_9x_coco.py'],
        ),
        (
            set_key('methods.mgd.losses.feature.type', 'MGDLos'),
            ['methods.mgd.losses.feature.type', "'MGDLos'", 'MGDLoss'],
        ),
        (set_key('methods.pkd.losses.feature.temperature', 2.0), ['methods.pkd.losses.feature', 'temperature']),
        (
            set_key('me_methods.dfmsd_no_sal.losses', {'sfa': {'type': 'PKDLoss', 'loss_weight': 1.0}}),
            ['me_methods.dfmsd_no_sal.aug_loss_weight', 'DMKDLoss'],
        ),
    ],
)
def test_what_needs_mmdet_names_the_key_too(buildable, change, needles):
    params = repository_params()
    buildable(copy.deepcopy(params))  # the unchanged file passes
    change(params)
    with pytest.raises(ParamsError) as err:
        buildable(params)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


# ---------------------------------------------------------------- reading params as a stage


@pytest.mark.fast
def test_stage_params_outside_a_stage(monkeypatch):
    monkeypatch.delenv('DVC_STAGE', raising=False)
    with pytest.raises(ParamsError, match='DVC_STAGE'):
        stage_params()


def test_stage_params_are_exactly_the_declared_keys(tmp_path, monkeypatch):
    root = copy_project(tmp_path / 'project')
    monkeypatch.chdir(root)
    monkeypatch.setenv('DVC_STAGE', f'teacher@{PAIR}-weak')
    params = stage_params()
    assert set(params) == {'data', 'train', 'runtime', 'launch', 'pairs'}
    assert params['pairs'] == {PAIR: {'weak': repository_params()['pairs'][PAIR]['weak']}}


def test_stage_params_wait_while_another_dvc_process_rewrites_dvc_lock(tmp_path):
    """A stage beside this one (``dvc --wait-for-lock repro --single-item``) holds the
    repository lock while DVC rewrites dvc.lock in place: the read waits for the lock rather
    than parse a half-written file (a YAMLValidationError that failed a stage in CI)."""
    from dvc.repo import Repo

    root = copy_project(tmp_path / 'project')
    lock = root / 'dvc.lock'
    whole = (REPO / 'dvc.lock').read_text()  # the committed one (the copy has none)
    script = 'import json; from dfmsd.core.params import stage_params; print(json.dumps(stage_params()))'
    with Repo(str(root)) as repo, repo.lock:  # what the writing DVC process holds
        lock.write_text(whole[: len(whole) // 2] + '\n  bad: [')
        reader = subprocess.Popen(
            [sys.executable, '-c', script],
            cwd=root,
            env=env(PYTHONPATH=str(root), DVC_STAGE=f'teacher@{PAIR}-weak'),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            reader.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
        waited = reader.returncode is None
        lock.write_text(whole)
    out, err = reader.communicate(timeout=120)
    assert waited, f'read dvc.lock while another process held the lock (exit {reader.returncode}): {err[-2000:]}'
    assert reader.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1])['pairs'] == {PAIR: {'weak': repository_params()['pairs'][PAIR]['weak']}}


@pytest.mark.fast
def test_lookup_names_the_undeclared_key():
    params = {'methods': {'mgd': {'label': 'MGD'}}, 'train': {'lr': 0.1}}
    assert lookup(params, 'methods.mgd.label') == 'MGD'
    cases = (('methods.dmkd.losses', 'methods.dmkd'), ('me', 'me'), ('train.lr.value', 'train.lr.value'))
    for dotted, missing in cases:
        with pytest.raises(ParamsError) as err:
            lookup(params, dotted)
        assert f"'{missing}'" in str(err.value) and 'dvc.yaml' in str(err.value)


@pytest.mark.fast
def test_a_stage_reads_each_section_as_its_model_naming_the_key_path():
    declared = repository_params()  # what a stage declaring every key would get
    p = StageParams(declared)
    assert isinstance(p.method('sal_methods', 'dfmsd'), SALMethod)
    assert not isinstance(p.method('methods', 'mgd'), SALMethod)
    assert p.launch.nproc_per_node == declared['launch']['nproc_per_node']
    assert StageParams({}).launch.nproc_per_node == 1  # no launch key: one process

    declared['train']['iters'] = 0
    declared['students'][STUDENT]['depth'] = 7
    declared['sal_methods']['dfmsd']['split'] = 1.5
    broken = StageParams(declared)
    reads = {
        'train.iters': lambda: broken.train,
        f'students.{STUDENT}.depth': lambda: broken.student(STUDENT),
        'sal_methods.dfmsd.split': lambda: broken.method('sal_methods', 'dfmsd'),
        'distill': lambda: StageParams({'train': {'iters': 1}}).distill,  # not declared
    }
    for path, read in reads.items():
        with pytest.raises(ParamsError, match=f"^params.yaml: ({path}: |no key '{path}')"):
            read()
