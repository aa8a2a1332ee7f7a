"""The smoke DAG end to end, in a copy of the project, run by flows.runner as `make repro` does.

One run (module fixture, read only) with every stage audited (DFMSD_AUDIT): the tests then
check what the run produced, that each stage read and imported only what dvc.yaml declares
for it, that nothing reruns, and (in their own copies) that a rebuild is byte-identical,
whether the stages ran one at a time or two at once.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, copy_project, preset_params, run

from dfmsd.core.io import work_dir_label

#: files DVC itself reads while a stage asks for its params (dvc.api.params_show), besides
#: .dvc/, .git/ and every .gitignore; work_dirs/<stage>-* is the stage's own scratch (checkpoints)
DVC_OWN = ('dvc.yaml', 'dvc.lock', 'params.yaml', '.dvcignore')
#: what the stages that read the dataset depend on (dvc.yaml's `dataset` var), written by `data`
DATASET_MANIFEST = next(v['dataset'] for v in yaml.safe_load((REPO / 'dvc.yaml').read_text())['vars'] if 'dataset' in v)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The smoke DAG run once with 2 jobs: (project dir, audit dir, runner output)."""
    root = copy_project(tmp_path_factory.mktemp('smoke') / 'project', params=preset_params('smoke'))
    audit = tmp_path_factory.mktemp('audit')
    res = run([sys.executable, '-m', 'flows.runner', '--jobs', '2'], root, timeout=3600, DFMSD_AUDIT=str(audit))
    return root, audit, res.stdout


def lock(root: Path) -> dict:
    return yaml.safe_load((root / 'dvc.lock').read_text())['stages']


def out_hashes(root: Path) -> dict[str, str]:
    return {o['path']: o['md5'] for stage in lock(root).values() for o in stage.get('outs', [])}


def test_every_stage_ran_and_the_report_has_a_row_per_method(smoke):
    root, _, stdout = smoke
    stages = run([sys.executable, '-m', 'dvc', 'stage', 'list', '--name-only'], root).stdout.split()
    assert set(lock(root)) == set(stages)
    summary = stdout.split('| stage |')[-1]
    assert 'failed' not in summary and 'not run' not in summary
    assert 'exited with 75' not in stdout  # the runner's probe of a stage to train is not shown as a failure
    params = preset_params('smoke')
    rows = {r['row'] for r in csv.DictReader((root / 'reports/results.csv').open())}
    methods = {m for g in ('methods', 'me_methods', 'sal_methods') for m in params[g]}
    assert methods | {'baseline'} <= rows
    runs = list(csv.DictReader((root / 'reports/runs.csv').open()))
    assert {int(r['seed']) for r in runs if r['row'] == 'dfmsd'} == set(params['seeds'])
    summary = json.loads((root / 'reports/summary.json').read_text())
    assert 'dfmsd' in summary  # one student/pair group: {row: mAP}
    for figure in ('map_per_row', 'paired_differences', 'training_loss', 'me_area_ratio'):
        assert (root / f'reports/figures/{figure}.png').stat().st_size > 5000


def test_sal_stage_two_continues_stage_one_and_adds_me_views(smoke):
    root, _, _ = smoke
    record = json.loads((root / 'metrics/students/retinanet/seed0/tiny/dfmsd.json').read_text())
    stage1 = json.loads((root / 'models/students/retinanet/seed0/tiny/dfmsd.stage1/run.json').read_text())
    params = preset_params('smoke')
    iters, batch = params['train']['iters'], params['train']['batch_size']
    assert stage1['iters'] == iters // 2 and record['start_iter'] == iters // 2 and record['iters'] == iters
    assert record['images_seen'] == iters * batch  # every original image, in both stages
    assert 0 < record['views_seen'] <= (iters - iters // 2) * batch  # views in stage 2 only
    assert record['teacher_images'] == record['images_seen'] + record['views_seen']
    assert record['strides'] == [8, 16, 32]  # 64 px: the 1x1 stride-64 level is not distilled
    header = (root / 'logs/students/retinanet/seed0/tiny/dfmsd.csv').read_text().splitlines()[0]
    assert 'loss_distill_aug_s8' in header and 'loss_distill_sfa_s8' in header


def test_each_stage_reads_and_imports_only_what_dvc_yaml_declares(smoke):
    root, audit, _ = smoke
    stages = lock(root)
    data_root = preset_params('smoke')['data']['root']
    problems = []
    for record_file in sorted(audit.glob('*.json')):
        record = json.loads(record_file.read_text())
        stage = stages[record['stage']]
        declared = [d['path'] for d in stage.get('deps', [])]
        if DATASET_MANIFEST in declared:  # the splits' digests stand for the dataset's files
            declared.append(data_root)
        outs = [o['path'] for o in stage.get('outs', [])]

        def covered(path: str, allowed=declared) -> bool:
            return any(path == p or path.startswith(p.rstrip('/') + '/') for p in allowed)

        for path in record['opened']:
            dvc_own = path in DVC_OWN or Path(path).name == '.gitignore' or path.startswith(('.dvc/', '.git/'))
            own_scratch = path.startswith(f'work_dirs/{work_dir_label(record["stage"])}-')
            if not (covered(path) or covered(path, outs) or dvc_own or own_scratch):
                problems.append(f'{record["stage"]} read {path}')
        for module in record['modules']:
            if not covered(module):
                problems.append(f'{record["stage"]} imported {module}')
    assert len(list(audit.glob('*.json'))) >= len(stages)
    assert not sorted(set(problems)), 'undeclared reads:\n' + '\n'.join(sorted(set(problems)))


def test_nothing_reruns_and_a_param_change_reruns_exactly_what_reads_it(smoke):
    root, _, _ = smoke
    start = time.monotonic()
    again = run([sys.executable, '-m', 'dvc', 'repro'], root)
    print(f'no-op dvc repro: {time.monotonic() - start:.1f} s')
    assert 'Running stage' not in again.stdout
    status = run([sys.executable, '-m', 'dvc', 'status', '--json'], root)
    assert json.loads(status.stdout) == {}
    params = yaml.safe_load((root / 'params.yaml').read_text())
    original = (root / 'params.yaml').read_text()
    params['me']['threshold'] = 0.3
    (root / 'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(run([sys.executable, '-m', 'dvc', 'status', '--json'], root).stdout))
    finally:
        (root / 'params.yaml').write_text(original)
    assert changed == {s for s in lock(root) if s.startswith(('me_table@', 'report'))}


def test_a_rebuild_is_byte_identical_one_stage_at_a_time(smoke, tmp_path):
    """Another copy builds one distillation row and its inputs with --jobs 1: every output's
    hash equals the two-job run's (determinism across processes, and serial == concurrent)."""
    root, _, _ = smoke
    other = copy_project(tmp_path / 'project', params=preset_params('smoke'))
    target = 'evaluate_sal@retinanet-tiny-dfmsd-0'
    run([sys.executable, '-m', 'flows.runner', '--jobs', '1', '--target', target], other, timeout=3600)
    mine, theirs = out_hashes(other), out_hashes(root)
    assert mine and all(theirs[path] == md5 for path, md5 in mine.items()), {
        p: (m, theirs.get(p)) for p, m in mine.items() if theirs.get(p) != m
    }
