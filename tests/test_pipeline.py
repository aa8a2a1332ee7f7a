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

from conftest import copy_project, run_flow

VENV_BIN = str(Path(sys.executable).parent)


def run(cmd, cwd, check=True, **kw):
    env = dict(os.environ, PATH=f'{VENV_BIN}:{os.environ["PATH"]}', DVC_NO_ANALYTICS='1')
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f'{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}')
    return res


@pytest.fixture(scope='module')
def smoke(tmp_path_factory, prefect_api):
    """A project copy with the smoke preset applied, run once by the Prefect flow."""
    root = copy_project(tmp_path_factory.mktemp('smoke'))
    run([sys.executable, '-m', 'dfmsd.presets', 'smoke'], root)
    os.environ['PATH'] = f'{VENV_BIN}:{os.environ["PATH"]}'  # stage commands call `python`
    state, tasks = run_flow(root)
    assert state.is_completed(), state.message
    return root, tasks


def lock_md5(root: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((root / 'dvc.lock').read_text())['stages'][stage]
    return next(o['md5'] for o in lock['outs'] if o['path'] == path)


def test_report_has_every_method_row_with_measured_numbers(smoke):
    root, _ = smoke
    rows = list(csv.DictReader((root / 'reports/results.csv').open()))
    assert [r['name'] for r in rows] == ['teacher_weak', 'teacher_strong', 'student', 'mgd', 'dmkd',
                                         'pkd', 'fgd', 'mar', 'pcd', 'crosskd', 'dfmsd_stage2']
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


def test_flow_ran_one_task_per_stage_in_dependency_order(smoke):
    root, tasks = smoke
    stages = run(['dvc', 'stage', 'list', '--name-only'], root).stdout.split()
    assert sorted(tasks) == sorted(stages)
    assert {t.state.name for t in tasks.values()} == {'Completed'}
    edges = [('teacher@teacher_weak', 'teacher_boxes'), ('teacher_boxes', 'augment'),
             ('teacher@teacher_weak', 'distill@dfmsd_stage1'), ('augment', 'distill_me@dfmsd_stage2'),
             ('distill@dfmsd_stage1', 'distill_me@dfmsd_stage2'), ('student_init', 'baseline'),
             ('distill_me@dfmsd_stage2', 'evaluate@dfmsd_stage2'), ('evaluate@dfmsd_stage2', 'report')]
    for up, down in edges:  # with concurrency 1, a stage starts only after its upstream ended
        assert tasks[up].end_time <= tasks[down].start_time, (up, down)
    aug = json.loads((root / 'data/augmented/annotations.json').read_text())
    assert {im['me_op'] for im in aug['images']} <= {'noise', 'none', 'crop'}
    loss_log = (root / 'logs/dfmsd_stage2.csv').read_text().splitlines()[0]
    assert 'loss_distill_aug_s8' in loss_log and 'loss_distill_sfa_s8' in loss_log


def test_second_flow_run_skips_every_stage_and_repro_has_nothing_to_do(smoke):
    root, _ = smoke
    state, tasks = run_flow(root)
    assert state.is_completed()
    assert {t.state.name for t in tasks.values()} == {'Skipped'}
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


def test_reviewer_checkout_pull_repro_gives_the_same_numbers(smoke, tmp_path):
    """Results committed + artifacts pushed -> a fresh clone pulls, has nothing to rerun,
    and `dvc metrics show` prints the committed numbers; `dvc exp run -S` sweeps a param."""
    root, _ = smoke
    remote = tmp_path / 'remote'
    git = ['git', '-c', 'user.email=t@t', '-c', 'user.name=t']
    run(['dvc', 'remote', 'modify', '--local', 'local', 'url', str(remote)], root)
    run(git + ['add', '-A'], root)
    run(git + ['commit', '-qm', 'smoke results'], root)
    run(['dvc', 'push'], root)
    expected = json.loads(run(['dvc', 'metrics', 'show', '--json'], root).stdout)

    clone = tmp_path / 'clone'
    run(['git', 'clone', '-q', str(root), str(clone)], tmp_path)
    run(['dvc', 'remote', 'modify', '--local', 'local', 'url', str(remote)], clone)
    run(['dvc', 'pull'], clone)
    assert (clone / 'models/dfmsd_stage2.pth').is_file()
    again = run(['dvc', 'repro'], clone)
    assert 'Running stage' not in again.stdout
    shown = json.loads(run(['dvc', 'metrics', 'show', '--json'], clone).stdout)
    strip = lambda d: {k: v for k, v in next(iter(d.values()))['data'].items()}  # noqa: E731
    assert strip(shown) == strip(expected)

    sweep = run(['dvc', 'exp', 'run', '-S', 'augment.threshold=0.3', '-n', 'threshold-0.3'], clone)
    assert "Running stage 'augment'" in sweep.stdout and "Running stage 'baseline'" not in sweep.stdout
    exps = run(['dvc', 'exp', 'show', '--json'], clone).stdout
    assert 'threshold-0.3' in exps
