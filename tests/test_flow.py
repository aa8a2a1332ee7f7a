"""The ``dvc-pipeline`` Prefect flow (flows/pipeline.py) on the tiny demo DVC project.

Everything runs for real: git, DVC subprocesses, the demo's stage commands (following
dfmsd.core.runs), and a temporary Prefect server (the ``prefect_api`` fixture). Task runs,
logs and artifacts are read back through the Prefect API, as the UI would; experiments
through ``dvc exp show --json``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import dvc_demo as demo
import pytest
import yaml
from support import REPO, env

from dfmsd.core.io import TEACHER_MEMO_DIR
from flows.output import LineLevels, cause_of
from flows.pipeline import dvc_pipeline
from flows.progress import RunProgress, parse_eta, parse_train_line
from flows.results import REPORT_KEY, REPORT_SUMMARY_KEY, SUMMARY_KEY, report_keys, slug

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------- helpers


def run_flow(root: Path, **params):
    """Run the flow in this process; its final state and its task runs by name (once the server
    has recorded one per stage: it records task runs from events, a moment later)."""
    import time

    state = dvc_pipeline(repo_dir=str(root), return_state=True, **params)
    summary = state.result(raise_on_failure=False)
    stages = len(summary['stages']) if isinstance(summary, dict) else 0
    deadline = time.monotonic() + 30
    while len(runs := task_runs(state.state_details.flow_run_id)) < stages and time.monotonic() < deadline:
        time.sleep(0.5)
    return state, runs


def api(path: str, body: dict) -> list[dict]:
    """POST a filter to the Prefect API (not the client's read_* helpers: they send nulls the
    server rejects)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.request('POST', path, json=body).json()


def task_runs(flow_run_id: UUID) -> dict:
    from prefect.client.schemas.objects import TaskRun

    runs = TaskRun.model_validate_list(api('/task_runs/filter', {'flow_runs': {'id': {'any_': [str(flow_run_id)]}}}))
    by_name = {tr.name: tr for tr in runs}
    assert len(by_name) == len(runs), [tr.name for tr in runs]  # one task run per stage
    return by_name


def flow_run_name(flow_run_id: UUID) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def artifacts(flow_run_id: UUID) -> dict:
    from prefect.client.schemas.objects import Artifact

    found = api('/artifacts/filter', {'artifacts': {'flow_run_id': {'any_': [str(flow_run_id)]}}})
    return {a.key: a for a in Artifact.model_validate_list(found) if a.key}


def task_logs(task_run_id: UUID, level: int | None = None) -> list[str]:
    """The task run's log messages (at ``level`` only, if given)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    logs = api('/logs/filter', {'logs': {'task_run_id': {'any_': [str(task_run_id)]}}, 'limit': 200})
    return [entry['message'] for entry in logs if level is None or entry['level'] == level]


def state_names(runs: dict) -> dict[str, str]:
    return {name: tr.state.name for name, tr in runs.items()}


def experiments(root: Path) -> set[str]:
    """Names of the experiments ``dvc exp show --json`` lists in ``root``."""
    res = subprocess.run(
        [sys.executable, '-m', 'dvc', 'exp', 'show', '--json'],
        cwd=root,
        env=demo.dvc_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return {exp['name'] for base in json.loads(res.stdout) for exp in base.get('experiments') or [] if exp['name']}


def git_head(root: Path) -> str:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- no Prefect


@pytest.mark.fast
def test_progress_lines_of_mmengine():
    it = parse_train_line('... - mmengine - INFO - Iter(train) [ 2000/90000]  lr: 0.02  eta: 1 day, 2:03:04')
    assert it is not None and it.percent == pytest.approx(100 * 2000 / 90000)
    ep = parse_train_line('Epoch(train)  [3][ 50/100]  base_lr: 1.0e-02  time: 0.4', elapsed_s=10)
    assert ep is not None and ep.percent == pytest.approx(50.0)
    eta = parse_train_line('Epoch(train)  [3][ 50/100]  eta: 0:01:30  time: 0.4', elapsed_s=30)
    assert eta is not None and eta.percent == pytest.approx(25.0)
    assert parse_train_line('Epoch(val)  [3][ 50/100]  eta: 0:01:30') is None
    assert parse_train_line('nothing to see') is None
    assert parse_eta('eta: 2 days, 1:00:05') == 2 * 86400 + 3605


@pytest.mark.fast
def test_output_lines_get_their_levels():
    """Lines as the stages print them (student_init's mmengine dump, DVC's advice, a warning)."""
    lines = [
        ('12/06 04:26:00 - mmengine - INFO - ', logging.DEBUG),  # a record with no text
        ('backbone.conv1.weight - torch.Size([16, 3, 7, 7]): ', logging.DEBUG),  # init_weights' dump...
        ('KaimingInit: a=0, mode=fan_out, nonlinearity=relu, distribution =normal, bias=0', logging.DEBUG),
        ('12/06 04:26:01 - mmengine - WARNING - The model and loaded state dict do not match', logging.WARNING),
        ('12/06 04:26:01 - mmengine - INFO - Iter(train) [ 3/12]  lr: 1.0e-02  loss: 1.5', logging.INFO),
        ('/x/torch/functional.py:554: UserWarning: torch.meshgrid: pass the indexing argument.', logging.WARNING),
        ('  return _VF.meshgrid(tensors, **kwargs)', logging.WARNING),  # the warning's source line
        ('[distill] students/retinanet: done', logging.INFO),
        ('To track the changes with git, run:', logging.DEBUG),
        ('\tgit add dvc.lock', logging.DEBUG),
        ('To enable auto staging, run:', logging.DEBUG),
        ('\tdvc config core.autostage true', logging.DEBUG),
        ('Use `dvc push` to send your updates to remote storage.', logging.DEBUG),
        ('error [distill@x]: training diverged: loss inf at iteration 3', logging.INFO),  # ERROR once, later
    ]
    level_of = LineLevels()
    assert [(line, level_of(line)) for line, _ in lines] == lines


@pytest.mark.fast
def test_run_progress_counts_stages_and_trainings_in_flight():
    progress = RunProgress(total=4, key='run-progress-x')  # outside a flow: nothing is sent
    progress.done('data', 'ran')
    progress.done('teacher', 'restored')
    progress.training('distill@a', 50.0)
    assert progress.percent() == pytest.approx(100 * 2.5 / 4)
    assert progress.describe() == '62% · 2 of 4 stages done (1 ran, 1 restored); training: `distill@a` 50%'
    progress.done('distill@a', 'failed')
    assert progress.describe() == '75% · 3 of 4 stages done (1 failed, 1 ran, 1 restored)'


@pytest.mark.fast
def test_the_cause_of_a_failure():
    traceback = ['Traceback (most recent call last):', '  File "x.py", line 1', 'ValueError: bad shape (3, 4)']
    dvc_error = "ERROR: failed to reproduce 'distill@x': failed to run: python stages/distill.py, exited with 2"
    ours = 'error [distill@x]: training diverged: loss inf at iteration 3'
    assert cause_of(['Running stage', ours, dvc_error]) == ours
    assert cause_of([*traceback, dvc_error]) == 'ValueError: bad shape (3, 4)'
    assert cause_of(['some output', dvc_error]) == dvc_error
    assert cause_of(['all is well']) is None


# --------------------------------------------------------------------------- the flow


@pytest.fixture(scope='module')
def first(prefect_api, tmp_path_factory):
    """A fresh project run once with 2 jobs; what the run left, captured before any test."""
    root = demo.make_project(tmp_path_factory.mktemp('first') / 'proj')
    head = git_head(root)
    state, runs = run_flow(root, jobs=2)
    flow_run_id = state.state_details.flow_run_id
    return {
        'root': root,
        'head': head,
        'state': state,
        'task_runs': runs,
        'name': flow_run_name(flow_run_id),
        'id': str(flow_run_id),
        'artifacts': artifacts(flow_run_id),
        'log': demo.read_run_log(root),
        'report': (root / 'reports' / 'results.md').read_text(),
        'experiments': experiments(root),
        'memo_left': (root / TEACHER_MEMO_DIR).exists(),
    }


def test_each_stage_is_a_task_run_named_after_it_in_dependency_order(first):
    assert first['state'].is_completed(), first['state'].message
    runs = first['task_runs']
    assert set(runs) == set(demo.STAGES)  # train@small, train@large: foreach expanded
    for name, tr in runs.items():
        assert tr.state.type.value == 'COMPLETED' and tr.state.name == 'Completed', (name, tr.state)
    assert sorted(name for name, _, event, _ in first['log'] if event == 'start') == sorted(demo.STAGES)  # once each
    # the upstream stages' task runs are each task's wait_for: the UI draws the DVC DAG
    names = {tr.id: name for name, tr in runs.items()}
    for name, tr in runs.items():
        upstream = {names[ref.id] for ref in tr.task_inputs.get('wait_for', [])}
        assert upstream == {up for up, down in demo.EDGES if down == name}, name
    for up, down in demo.EDGES:
        assert runs[up].end_time <= runs[down].start_time, f'{down} started before {up} ended'


def test_stage_output_is_streamed_into_task_logs(first):
    messages = task_logs(first['task_runs']['train@small'].id)
    assert any('[train@small] training in work_dirs/train-small-' in m for m in messages), messages
    assert any('Iter(train) [3/3]' in m for m in messages), messages
    assert any("Running stage 'train@small'" in m for m in messages), messages


def test_the_trainings_share_the_runs_teacher_memo_which_goes_with_the_run(first):
    memo = first['root'] / TEACHER_MEMO_DIR
    for stage in demo.TRAINING:
        assert any(f'teacher memo: {memo}' in m for m in task_logs(first['task_runs'][stage].id)), stage
    assert not first['memo_left']


def test_artifacts_of_the_run(first):
    arts = first['artifacts']
    summary = arts[SUMMARY_KEY]
    assert summary.type == 'table'
    rows = json.loads(summary.data) if isinstance(summary.data, str) else summary.data
    assert {r['stage']: r['outcome'] for r in rows} == {s: 'ran' for s in demo.STAGES}
    assert all(isinstance(r['seconds'], (int, float)) for r in rows)

    assert arts[REPORT_KEY].type == 'markdown' and arts[REPORT_KEY].data == first['report']
    table = arts[REPORT_SUMMARY_KEY]
    assert table.type == 'table'
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    dfmsd = next(r for r in rows if r['row'] == 'dfmsd')
    assert dfmsd['group'] == 'retinanet/tiny' and dfmsd['mAP'] == 22.25 and dfmsd['gain'] == 1.75

    # train@* print three mmengine `Iter(train) [i/3]` lines: a progress artifact, at 100 %
    for stage in demo.TRAINING:
        progress = arts[f'progress-{slug(stage)}']
        assert progress.type == 'progress' and float(progress.data) == pytest.approx(100.0)


def test_the_run_is_recorded_as_a_dvc_experiment(first):
    assert f'flow-{first["id"][:8]}' in first['experiments']
    assert f'saved as DVC experiment `flow-{first["id"][:8]}`' in first['artifacts'][SUMMARY_KEY].description
    assert first['name'] == 'default · 7 ran'  # the runs list tells what the run did
    assert git_head(first['root']) == first['head']  # the workspace's commit is untouched


def test_states_skipped_restored_and_forced(first):
    """Mutates the module's project; the other tests read only what the fixture captured."""
    root = first['root']
    log_before = (root / 'run.log').read_text()

    saved = experiments(root)
    state, runs = run_flow(root)
    assert state.is_completed(), state.message
    assert experiments(root) == saved  # a no-op run records no experiment
    assert flow_run_name(state.state_details.flow_run_id) == 'default · 7 up to date'
    assert state_names(runs) == {name: 'Skipped' for name in demo.STAGES}
    assert all(tr.state.is_completed() for tr in runs.values())
    assert {tr.state.message for tr in runs.values()} == {'up to date (dvc status)'}
    assert (root / 'run.log').read_text() == log_before  # no command re-executed

    # a param flip and back: the second run is restored from DVC's run-cache
    original = (root / 'params.yaml').read_text()
    (root / 'params.yaml').write_text(yaml.safe_dump({**yaml.safe_load(original), 'seeds': [5]}, sort_keys=False))
    state, runs = run_flow(root, targets=['prepare'])
    assert state_names(runs) == {'prepare': 'Completed'}
    (root / 'params.yaml').write_text(original)
    log_before = (root / 'run.log').read_text()
    state, runs = run_flow(root, targets=['prepare'])
    assert state.is_completed(), state.message
    assert state_names(runs) == {'prepare': 'Restored'}
    assert runs['prepare'].state.message == 'restored from the DVC run-cache'
    assert (root / 'run.log').read_text() == log_before

    # force: the stage runs again, though nothing changed
    state, runs = run_flow(root, targets=['lonely'], force=True)
    assert state_names(runs) == {'lonely': 'Completed'}
    assert demo.commands_run(root).count('lonely') == 2


def test_a_failing_stage_stops_its_downstream_only(prefect_api, tmp_path):
    root = demo.make_project(tmp_path / 'proj', fail='left')
    state, runs = run_flow(root, jobs=2)

    assert state.is_failed()
    assert state.message == '1 DVC stage(s) failed: left; not run: train@large, train@small, report'
    left = runs['left'].state
    assert left.is_failed()
    cause = "ERROR: failed to reproduce 'left'"  # DVC's words: `left` is `exit 3`, with no output of its own
    assert left.message.startswith(cause) and 'exited with 3' in left.message
    # the cause at ERROR, readable (real line breaks), the output's tail once; the stage's own
    # lines stay below ERROR, and Prefect's own lines on the failed state carry no tail
    errors = task_logs(runs['left'].id, level=logging.ERROR)
    ours = [m for m in errors if not m.startswith(('Finished in state', 'Task run failed with state'))]
    assert len(ours) == 1 and ours[0].startswith("DVC stage 'left' failed (exit code 255): " + cause), errors
    assert ours[0].count('\n') >= 2 and sum(m.count('Running stage') for m in errors) == 1, errors
    for name in ('train@small', 'train@large', 'report'):  # downstream of `left`: never run, then ended
        tr = runs[name]
        assert tr.state.type.value == 'CANCELLED' and tr.state.name == 'NotReady', name
        assert tr.end_time is not None  # a final state: not drawn as running
    for name in ('prepare', 'right', 'lonely'):  # the other branches ran
        assert runs[name].state.is_completed(), (name, runs[name].state)
    assert sorted(demo.commands_run(root)) == ['lonely', 'prepare', 'right']
    assert experiments(root) == set()  # a failed run is not recorded as an experiment
    arts = artifacts(state.state_details.flow_run_id)
    rows = arts[SUMMARY_KEY].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {r['stage']: r['outcome'] for r in rows}['report'] == 'not run'
    assert {r['stage']: r['details'] for r in rows}['left'].startswith(cause)
    assert REPORT_KEY not in arts  # the report did not run: no report of another run is shown
    assert flow_run_name(state.state_details.flow_run_id) == 'default · 1 failed · 3 not run · 3 ran'


def test_a_failed_training_shows_its_cause_and_where_it_stopped(prefect_api, tmp_path):
    root = demo.make_project(tmp_path / 'proj', fail_training='train@small')
    state, runs = run_flow(root, targets=['train@small'])
    assert state.is_failed()
    cause = 'error [train@small]: training diverged: loss inf at iteration 1'
    assert runs['train@small'].state.message == cause
    errors = task_logs(runs['train@small'].id, level=logging.ERROR)
    assert any(m.startswith(f"DVC stage 'train@small' failed (exit code 255): {cause}\n") for m in errors), errors
    progress = artifacts(state.state_details.flow_run_id)[f'progress-{slug("train@small")}']
    assert float(progress.data) == pytest.approx(100 / 3)
    assert progress.description.startswith('33% · failed at iteration 1/3 · ')
    assert flow_run_name(state.state_details.flow_run_id) == 'default · 1 failed · 2 ran'


def test_retries_rerun_a_failed_stage(prefect_api, tmp_path):
    root = demo.make_project(tmp_path / 'proj', flaky='lonely')
    state, runs = run_flow(root, targets=['lonely'], retries=1, retry_delay_seconds=0)
    assert state.is_completed(), state.message
    assert state_names(runs) == {'lonely': 'Completed'}
    assert runs['lonely'].run_count == 2
    assert (root / 'counter-lonely.txt').read_text() == '2'


def test_a_preset_runs_in_its_worktree_and_is_saved_there(prefect_api, tmp_path):
    root = demo.make_project(tmp_path / 'proj', presets={'tiny': {'seeds': [0, 7]}})
    params_before = (root / 'params.yaml').read_text()
    state, runs = run_flow(root, preset='tiny', targets=['left'])
    assert state.is_completed(), state.message
    assert state_names(runs) == {'prepare': 'Completed', 'left': 'Completed'}

    tree = root / '.presets' / 'tiny'
    assert (tree / 'data' / 'left.txt').is_file() and (tree / 'dvc.lock').is_file()
    lock = yaml.safe_load((tree / 'dvc.lock').read_text())
    assert lock['stages']['prepare']['params']['params.yaml'] == {'seeds': [0, 7]}
    # the repository itself: untouched
    assert (root / 'params.yaml').read_text() == params_before
    assert not (root / 'dvc.lock').exists() and not (root / 'data').exists()
    assert f'tiny-{str(state.state_details.flow_run_id)[:8]}' in experiments(tree)
    assert flow_run_name(state.state_details.flow_run_id) == 'tiny · 2 ran'
    assert not set(artifacts(state.state_details.flow_run_id)) & {*report_keys('tiny'), *report_keys(None)}


def test_a_preset_shows_its_own_report_only(prefect_api, tmp_path):
    """The repository's committed results are not the preset's: its worktree starts without
    them, and its report artifacts are its own, keyed by the preset."""
    root = demo.make_project(tmp_path / 'proj', presets={'tiny': {'seeds': [0, 7]}})
    state, _ = run_flow(root, targets=['report'])  # the repository's own results, committed
    assert state.is_completed(), state.message
    demo.git_commit(root, 'results')
    default_report = (root / 'reports' / 'results.md').read_text()

    state, runs = run_flow(root, preset='tiny', targets=['report'])
    assert state.is_completed(), state.message
    tree = root / '.presets' / 'tiny'
    own = (tree / 'reports' / 'results.md').read_text()
    assert own != default_report  # seeds 0 and 7, not the repository's
    arts = artifacts(state.state_details.flow_run_id)
    md_key, summary_key = report_keys('tiny')
    assert arts[md_key].data == own and summary_key in arts
    assert not set(arts) & set(report_keys(None))  # nothing under the repository's keys


def test_cli_with_a_preset_as_make_flow_runs_it(prefect_api, tmp_path):
    """`python -m flows --preset P --target T --jobs J --retries R` (make flow PRESET=P)."""
    from prefect.settings import PREFECT_API_URL

    root = demo.make_project(tmp_path / 'proj', presets={'tiny': {'seeds': [0, 7]}})
    cmd = [sys.executable, '-m', 'flows', '--repo', str(root), '--preset', 'tiny']
    cmd += ['--target', 'lonely', '--jobs', '2', '--retries', '0']
    res = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=env(PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert '| `lonely` | ran |' in res.stdout
    assert 'recorded as DVC experiment tiny-' in res.stdout
    assert (root / '.presets' / 'tiny' / 'data' / 'lonely.txt').is_file()
    assert any(name.startswith('tiny-') for name in experiments(root / '.presets' / 'tiny'))

    bad = subprocess.run(
        [sys.executable, '-m', 'flows', '--repo', str(root), '--target', 'nope'],
        cwd=tmp_path,
        env=env(PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "error [flow]: no DVC stage named 'nope'" in bad.stderr
    assert 'Traceback' not in bad.stdout + bad.stderr
