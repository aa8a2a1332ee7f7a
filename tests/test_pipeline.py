"""The smoke preset's `dvc repro`, end to end, in a temporary copy of the project."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_project

VENV_BIN = str(Path(sys.executable).parent)


def run(cmd, cwd, check=True, **kw):
    env = dict(os.environ, PATH=f'{VENV_BIN}:{os.environ["PATH"]}', DVC_NO_ANALYTICS='1')
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f'{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}')
    return res


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """A project copy with the smoke preset applied and `dvc repro` run once."""
    root = copy_project(tmp_path_factory.mktemp('smoke'))
    run([sys.executable, '-m', 'dfmsd.presets', 'smoke'], root)
    first = run(['dvc', 'repro'], root)
    return root, first


def lock_md5(root: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((root / 'dvc.lock').read_text())['stages'][stage]
    return next(o['md5'] for o in lock['outs'] if o['path'] == path)


def test_report_has_every_method_row_with_measured_numbers(smoke):
    root, _ = smoke
    rows = list(csv.DictReader((root / 'reports/results.csv').open()))
    assert [r['name'] for r in rows] == ['teacher_weak', 'teacher_strong', 'student', 'mgd', 'dmkd',
                                         'pkd', 'dfmsd_stage2']
    for r in rows:  # each row's numbers are the ones its evaluate stage measured
        metrics = json.loads((root / f"metrics/{r['name']}.json").read_text())
        assert float(r['mAP']) == pytest.approx(metrics['mAP'])
        assert float(r['AR@100']) == pytest.approx(metrics['AR@100'])
    dfmsd = next(r for r in rows if r['name'] == 'dfmsd_stage2')
    assert int(dfmsd['iters']) == 12  # 6 + 6: SAL budgets add up
    md = (root / 'reports/results.md').read_text()
    assert 'DFMSD' in md and 'Verdicts' in md
    for fig in ('map_per_method', 'training_loss', 'me_area_ratio'):
        assert (root / f'reports/figures/{fig}.png').stat().st_size > 5000


def test_stagewise_path_ran_in_order_with_me(smoke):
    root, first = smoke
    out = first.stdout
    order = [out.index(f"Running stage '{s}'") for s in
             ('teacher@teacher_weak', 'teacher_boxes', 'distill@dfmsd_stage1', 'augment',
              'distill_me@dfmsd_stage2', 'report')]
    assert order == sorted(order)
    aug = json.loads((root / 'data/augmented/annotations.json').read_text())
    assert {im['me_op'] for im in aug['images']} <= {'noise', 'none', 'crop'}
    loss_log = (root / 'logs/dfmsd_stage2.csv').read_text().splitlines()[0]
    assert 'loss_distill_aug_s8' in loss_log and 'loss_distill_sfa_s8' in loss_log


def test_second_repro_has_nothing_to_do(smoke):
    root, _ = smoke
    again = run(['dvc', 'repro'], root)
    assert 'Running stage' not in again.stdout
    status = run(['dvc', 'status', '--json'], root)
    assert json.loads(status.stdout) == {}
    shown = run(['dvc', 'metrics', 'show', '--json'], root)
    assert 'metrics/dfmsd_stage2.json' in shown.stdout


def test_training_and_eval_are_deterministic(smoke):
    root, _ = smoke
    before = (lock_md5(root, 'baseline', 'models/student.pth'),
              json.loads((root / 'metrics/student.json').read_text()))
    run(['dvc', 'repro', '--force', '--single-item', 'baseline'], root)
    run(['dvc', 'repro', '--force', '--single-item', 'evaluate@student'], root)
    after = (lock_md5(root, 'baseline', 'models/student.pth'),
             json.loads((root / 'metrics/student.json').read_text()))
    assert before == after
