"""The smoke DAG end to end, in a copy of the project, run by the Prefect flow as `make repro
SCHEDULER=...` does, its heavy stages on a real Dask cluster over loopback: a `dask scheduler`
and two `dask worker --nthreads 1 --resources GPU=1` processes (tests/loopback.py).

One run (module fixture, read only) with every stage audited (DFMSD_AUDIT): the tests then
check what the run produced, where the trainings ran and how many at once, that each stage
read and imported only what dvc.yaml declares for it, that nothing reruns, and (in their own
copies) that a serial `dvc repro` and a run on workers without a shared filesystem give the
same bytes.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import loopback
import pytest
import yaml
from support import REPO, copy_project, env, preset_params, run

from dfmsd.core.io import TEACHER_MEMO_DIR, work_dir_label

#: files DVC itself reads while a stage asks for its params (dvc.api.params_show), besides
#: .dvc/, .git/ and every .gitignore; work_dirs/<stage>-* is the stage's own scratch (checkpoints)
DVC_OWN = ('dvc.yaml', 'dvc.lock', 'params.yaml', '.dvcignore')
#: what the stages that read the dataset depend on (dvc.yaml's `dataset` var), written by `data`
#: The heavy stage groups (dvc.yaml `meta: {engine: dask}`): run on the Dask workers.
HEAVY = {name for name, stage in yaml.safe_load((REPO / 'dvc.yaml').read_text())['stages'].items()
         if (stage.get('meta') or stage.get('do', {}).get('meta') or {}).get('engine') == 'dask'}  # fmt: skip
DATASET_MANIFEST = next(v['dataset'] for v in yaml.safe_load((REPO / 'dvc.yaml').read_text())['vars'] if 'dataset' in v)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The smoke DAG run once on two loopback Dask workers: (project dir, audit dir, flow
    output, the heavy stage processes seen and the most at once, worker names by address)."""
    root = copy_project(tmp_path_factory.mktemp('smoke') / 'project', params=preset_params('smoke'))
    audit = tmp_path_factory.mktemp('audit')
    logs = tmp_path_factory.mktemp('dask')
    with loopback.cluster(logs, workers=2, DFMSD_AUDIT=str(audit)) as dask:
        names = {address: name for name, address in dask.wait_for_workers(2).items()}
        with loopback.TrainingWatch(root, dask.workers) as watch:
            cmd = [sys.executable, '-m', 'flows', '--no-experiment', '--scheduler', dask.address]
            res = run(cmd, root, timeout=3600, DFMSD_AUDIT=str(audit))
    return SimpleNamespace(root=root, audit=audit, stdout=res.stdout, watch=watch, names=names)


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The flow's summary table: stage -> [outcome, time, worker, details]."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) == 5 and cells[0].startswith('`'):
            rows[cells[0].strip('`')] = cells[1:]
    return rows


def lock(root: Path) -> dict:
    return yaml.safe_load((root / 'dvc.lock').read_text())['stages']


def out_hashes(root: Path) -> dict[str, str]:
    return {o['path']: o['md5'] for stage in lock(root).values() for o in stage.get('outs', [])}


def test_every_stage_ran_and_the_report_has_a_row_per_method(smoke):
    root = smoke.root
    stages = run([sys.executable, '-m', 'dvc', 'stage', 'list', '--name-only'], root).stdout.split()
    assert set(lock(root)) == set(stages)
    assert {row[0] for row in summary_rows(smoke.stdout).values()} == {'ran'}
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


def test_the_trainings_ran_on_both_workers_never_more_than_two_at_once(smoke):
    rows = summary_rows(smoke.stdout)
    heavy = {s for s in rows if s.split('@')[0] in HEAVY}
    assert heavy and all(rows[s][2] for s in heavy)  # each on a worker: "host tcp://..."
    assert not any(rows[s][2] for s in rows if s not in heavy)  # the light ones in the workspace
    used = {smoke.names[rows[s][2].split()[-1]] for s in heavy}
    assert used == {'w0', 'w1'}, used
    trained = {w for w in smoke.watch.seen.values()}
    assert trained == {'w0', 'w1'}, smoke.watch.seen  # seen running under each worker's process
    assert smoke.watch.most == 2, smoke.watch.most  # two slots, both used, never a third


def test_sal_stage_two_continues_stage_one_and_adds_me_views(smoke):
    root = smoke.root
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
    root, audit = smoke.root, smoke.audit
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
            # the run's teacher-feature memo: keyed by the digests of declared inputs (the teacher's
            # config and weights, the batch), so it adds no dependency; the same bytes without it:
            # test_a_serial_dvc_repro_gives_the_same_bytes, tests/test_training.py
            memo = path.startswith(f'{TEACHER_MEMO_DIR.as_posix()}/')
            if not (covered(path) or covered(path, outs) or dvc_own or own_scratch or memo):
                problems.append(f'{record["stage"]} read {path}')
        for module in record['modules']:
            if not covered(module):
                problems.append(f'{record["stage"]} imported {module}')
    assert len(list(audit.glob('*.json'))) >= len(stages)
    assert not sorted(set(problems)), 'undeclared reads:\n' + '\n'.join(sorted(set(problems)))


def test_nothing_reruns_and_a_param_change_reruns_exactly_what_reads_it(smoke):
    root = smoke.root
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


#: A distillation row and its upstream: the teachers, the ME boxes and table, SAL's two stages.
ROW = 'evaluate_sal@retinanet-tiny-dfmsd-0'
#: A baseline and its upstream (data, student_init): one training, one evaluation.
BASELINE = 'evaluate_baseline@retinanet-0'


def assert_same_as_smoke(root: Path, smoke_root: Path, expect: set[str]) -> None:
    """Every stage ``root`` ran has the smoke run's dvc.lock entry and output hashes."""
    mine, theirs = lock(root), lock(smoke_root)
    assert expect <= set(mine), sorted(mine)
    for stage, entry in mine.items():
        assert entry == theirs[stage], stage
    hashes, reference = out_hashes(root), out_hashes(smoke_root)
    assert hashes and all(reference[path] == md5 for path, md5 in hashes.items())


def test_a_serial_dvc_repro_gives_the_same_bytes(smoke, tmp_path):
    """Another copy builds one distillation row and its inputs with plain `dvc repro`, one
    stage at a time: every dvc.lock entry and output hash equals the two-worker run's."""
    other = copy_project(tmp_path / 'project', params=preset_params('smoke'))
    run([sys.executable, '-m', 'dvc', 'repro', ROW], other, timeout=3600)
    assert_same_as_smoke(other, smoke.root, {ROW, 'sal2@retinanet-tiny-dfmsd-0', 'teacher@tiny-strong'})


def test_workers_without_a_shared_filesystem_give_the_same_bytes(smoke, tmp_path):
    """Two machines, simulated: each worker runs its own clone of the repository, and all they
    share with the controller is a DVC remote (a directory). The controller restores each heavy
    stage from the run-cache its worker pushed."""
    controller = copy_project(tmp_path / 'controller', params=preset_params('smoke'))
    run([sys.executable, '-m', 'dvc', 'remote', 'add', '-d', 'shared', str(tmp_path / 'remote')], controller)
    subprocess.run(['git', 'commit', '-qam', 'the shared DVC remote'], cwd=controller, check=True, env=env())
    clones = {}
    for name in ('w0', 'w1'):
        clones[name] = tmp_path / name
        subprocess.run(['git', 'clone', '-q', str(controller), str(clones[name])], check=True)
    with loopback.cluster(tmp_path / 'dask') as dask:
        for name, clone in clones.items():
            dask.start_worker(name, cwd=clone, DFMSD_WORKER_REPO=str(clone))
        names = {address: name for name, address in dask.wait_for_workers(2).items()}
        cmd = [sys.executable, '-m', 'flows', '--no-experiment', '--target', BASELINE]
        res = run([*cmd, '--scheduler', dask.address, '--no-shared-fs'], controller, timeout=1800)
    rows = summary_rows(res.stdout)
    heavy = ['baseline@retinanet-0', BASELINE]
    assert all(rows[s][0] == 'restored' and rows[s][2].split()[-1] in names for s in heavy), rows
    for stage in heavy:  # it ran in a worker's clone, which DVC recorded there
        ran_in = [c for c in clones.values() if stage in (lock(c) if (c / 'dvc.lock').exists() else {})]
        assert ran_in, stage
    assert_same_as_smoke(controller, smoke.root, set(heavy))
