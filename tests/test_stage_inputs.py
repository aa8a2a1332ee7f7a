"""Stage commands on bad input: one clear error naming the file or key, nothing written.
And a training stage killed halfway resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_project

VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def project(tmp_path, tiny_dataset):
    root = copy_project(tmp_path / 'p')
    subprocess.run([sys.executable, '-m', 'dfmsd.presets', 'smoke'], cwd=root, check=True,
                   capture_output=True)
    shutil.copytree(tiny_dataset, root / 'data/synthetic')
    return root


def stage(root, *args, timeout=600):
    env = dict(os.environ, PATH=f'{VENV_BIN}:{os.environ["PATH"]}')
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def edit_params(root, fn):
    params = yaml.safe_load((root / 'params.yaml').read_text())
    fn(params)
    (root / 'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))


def assert_clean_error(res, *needles):
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error ['), res.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    assert 'Traceback' not in res.stderr


def test_corrupt_annotation_file(project):
    ann = project / 'data/synthetic/annotations/instances_train.json'
    ann.write_text(ann.read_text()[:500])  # truncated JSON
    res = stage(project, 'stages/train.py', 'teacher_weak')
    assert_clean_error(res, 'instances_train.json')
    assert not (project / 'models/teacher_weak.pth').exists()


def test_missing_annotation_file(project):
    (project / 'data/synthetic/annotations/instances_val.json').unlink()
    res = stage(project, 'stages/train.py', 'teacher_weak')
    assert_clean_error(res, 'instances_val.json')


def test_missing_image(project):
    victim = sorted((project / 'data/synthetic/train').iterdir())[3]
    victim.unlink()
    res = stage(project, 'stages/train.py', 'teacher_weak')
    assert_clean_error(res, victim.name)
    assert not (project / 'models').exists() or not any((project / 'models').iterdir())


def test_unknown_detector_name(project):
    res = stage(project, 'stages/train.py', 'teacher_mystery')
    assert_clean_error(res, 'teacher_mystery', 'teacher_weak')


def test_unknown_detector_config(project):
    edit_params(project, lambda p: p['teachers']['teacher_weak'].update(config='configs/small/yolo.py'))
    res = stage(project, 'stages/train.py', 'teacher_weak')
    assert_clean_error(res, 'models.teacher_weak.config', 'yolo.py')


def test_distill_run_with_unknown_teacher(project):
    edit_params(project, lambda p: p['distill']['runs']['mgd'].update(teacher='teacher_huge'))
    res = stage(project, 'stages/distill.py', 'mgd')
    assert_clean_error(res, 'teacher_huge')


def test_killed_training_resumes_from_last_checkpoint(project):
    edit_params(project, lambda p: (p['teachers']['teacher_weak'].update(iters=120),
                                    p['train'].update(checkpoint_interval=10)))
    env = dict(os.environ, PATH=f'{VENV_BIN}:{os.environ["PATH"]}')
    proc = subprocess.Popen([sys.executable, 'stages/train.py', 'teacher_weak'], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(project.glob('work_dirs/*/iter_*.pth')):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(project.glob('work_dirs/*/iter_*.pth'))
    assert saved, 'no checkpoint appeared before the kill'
    killed_at = int(saved[-1].stem.split('_')[1])
    assert killed_at < 120 and not (project / 'models/teacher_weak.pth').exists()

    res = stage(project, 'stages/train.py', 'teacher_weak')
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'resuming from' in res.stdout and f'iter_{killed_at}.pth' in res.stdout
    meta = torch.load(project / 'models/teacher_weak.pth', weights_only=True)['meta']
    assert meta['iters'] == 120
    assert not list(project.glob('work_dirs/*'))  # finished runs leave no resumable state
