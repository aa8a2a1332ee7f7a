"""How the Prefect flow schedules the DAG, on the tiny demo DVC project (tests/dvc_demo.py).

Everything is real: git, DVC subprocesses, a local Dask cluster whose workers run the
``train@*`` stages (dvc.yaml ``meta: {engine: dask}``), Prefect in ephemeral mode. Times come
from the demo's run.log, outcomes from the flow's StageResults.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dvc_demo as demo
import pytest
import yaml

from flows.pipeline import dvc_pipeline
from flows.stages import Pipeline, PipelineError

pytestmark = pytest.mark.timeout(300)

#: the longest a training stage waits for the other one to start (dvc_demo.make_project)
PARTNER_S = 10.0


def run_pipeline(root: Path, **params) -> list:
    """The flow in this process (no experiment); its StageResults in schedule order."""
    state = dvc_pipeline(repo_dir=str(root), experiment=False, return_state=True, **params)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, dict), summary
    return summary['results']


def outcomes(results) -> dict[str, str]:
    return {r.stage: r.outcome for r in results}


def spans(log) -> dict[str, tuple[float, float]]:
    """Each stage's first and last run.log time (a training stage: from training to export)."""
    out: dict[str, tuple[float, float]] = {}
    for name, _, _, t in log:
        first, _ = out.get(name, (t, t))
        out[name] = (first, t)
    return out


def training_spans(log) -> dict[str, tuple[float, float]]:
    return spans([entry for entry in log if entry[1] == 'train'])


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def outputs(root: Path) -> dict[str, bytes]:
    """Every output file of the demo pipeline, dvc.lock and DVC's run-cache."""
    files = [
        root / 'dvc.lock',
        root / 'metrics.json',
        *(p for p in (root / '.dvc' / 'cache' / 'runs').rglob('*') if p.is_file()),
    ]
    for folder in ('data', 'models', 'reports'):
        files += [p for p in (root / folder).rglob('*') if p.is_file() and p.name != '.gitignore']
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def snapshot(root: Path, results) -> dict:
    return {
        'root': root,
        'results': results,
        'log': demo.read_run_log(root),
        'outputs': outputs(root),
        'work_dirs': sorted(p.name for p in (root / 'work_dirs').glob('*')),
    }


@pytest.fixture(scope='module')
def two_jobs(tmp_path_factory):
    """The whole demo pipeline run once with 2 jobs (what it left, captured before any test)."""
    root = demo.make_project(tmp_path_factory.mktemp('jobs2') / 'proj', await_partner=PARTNER_S)
    return snapshot(root, run_pipeline(root, jobs=2))


@pytest.fixture(scope='module')
def one_job(tmp_path_factory):
    root = demo.make_project(tmp_path_factory.mktemp('jobs1') / 'proj', await_partner=PARTNER_S)
    return snapshot(root, run_pipeline(root, jobs=1))


@pytest.fixture(scope='module')
def serial(tmp_path_factory):
    """Plain ``dvc repro``: one stage at a time, in DVC's own order."""
    root = demo.make_project(tmp_path_factory.mktemp('serial') / 'proj', await_partner=PARTNER_S)  # same commands
    subprocess.run([sys.executable, '-m', 'dvc', 'repro', '-q'], cwd=root, env=demo.dvc_env(), check=True)
    return snapshot(root, [])


@pytest.mark.fast
def test_graph_changed_stages_and_targets_from_dvc(tmp_path):
    root = demo.make_project(tmp_path / 'proj')
    pipeline = Pipeline.read(root)
    assert set(pipeline.graph.nodes) == set(demo.STAGES)  # foreach expanded, real names
    assert set(pipeline.graph.edges) == set(demo.EDGES)  # incl. `left` reading a file inside prepare's dir out
    assert pipeline.changed == set(demo.STAGES)  # nothing ran yet
    assert {s for s, meta in pipeline.meta.items() if meta.get('engine') == 'dask'} == set(demo.TRAINING)
    assert set(Pipeline.read(root, ['train']).graph) == {'prepare', 'left', 'train@small', 'train@large'}
    assert set(Pipeline.read(root, ['right']).graph) == {'prepare', 'right'}
    with pytest.raises(PipelineError, match="no DVC stage named 'nope'"):
        Pipeline.read(root, ['nope'])


def test_every_stage_runs_once_in_dependency_order(two_jobs):
    assert outcomes(two_jobs['results']) == {s: 'ran' for s in demo.STAGES}
    log = two_jobs['log']
    assert sorted(name for name, _, event, _ in log if event == 'start') == sorted(demo.STAGES)  # each ran once
    # a training stage: one command, run by DVC on a Dask worker, that trains and exports
    for stage in demo.TRAINING:
        assert [(phase, event) for name, phase, event, _ in log if name == stage] == [
            ('train', 'start'),
            ('train', 'end'),
            ('none', 'exported'),
        ]
    where = {r.stage: r.where for r in two_jobs['results']}
    assert all(where[s].endswith(tuple('0123456789')) for s in demo.TRAINING), where  # host tcp://addr:port
    assert where['train@small'] != where['train@large']  # two workers, one training each
    assert not any(where[s] for s in demo.STAGES if s not in demo.TRAINING)  # light stages: in the workspace
    when = spans(log)
    for up, down in demo.EDGES:
        assert when[up][1] <= when[down][0], f'{down} started before {up} ended'


def test_two_jobs_train_two_stages_at_once(two_jobs):
    small, large = (training_spans(two_jobs['log'])[s] for s in demo.TRAINING)
    assert overlap(small, large) >= 0.5, (small, large)


def test_one_job_trains_one_stage_at_a_time(one_job):
    assert outcomes(one_job['results']) == {s: 'ran' for s in demo.STAGES}
    small, large = (training_spans(one_job['log'])[s] for s in demo.TRAINING)
    assert overlap(small, large) < 0, (small, large)


def test_outputs_lock_and_run_cache_are_the_bytes_of_a_serial_dvc_repro(two_jobs, one_job, serial):
    """Stages at once (up to four DVC commands: left, right, lonely, then two trainings beside
    them) leave what one `dvc repro` leaves, dvc.lock's bytes included, and one run-cache entry
    more: `report`'s, which DVC skips for its uncached outputs (flows.stages.record_run_cache)."""
    assert {'models/small.txt', 'models/large.txt', 'reports/results.md', 'dvc.lock'} <= serial['outputs'].keys()
    assert any(p.startswith('.dvc/cache/runs/') for p in serial['outputs'])
    for run in (two_jobs, one_job):
        (extra,) = run['outputs'].keys() - serial['outputs'].keys()
        assert extra.startswith('.dvc/cache/runs/') and 'step.py report' in yaml.safe_load(run['outputs'][extra])['cmd']
        for path, content in serial['outputs'].items():
            assert run['outputs'][path] == content, path


def test_work_dirs_are_removed_after_export(two_jobs, one_job):
    assert two_jobs['work_dirs'] == [] and one_job['work_dirs'] == []


def test_rerun_skips_and_the_run_cache_restores(two_jobs):
    """Mutates the module's project; the other tests read only what the fixture captured."""
    root = two_jobs['root']
    log_before = (root / 'run.log').read_text()

    # nothing changed: every stage skipped on `dvc status --json`, no command run
    results = run_pipeline(root, jobs=2)
    assert outcomes(results) == {s: 'skipped' for s in demo.STAGES}
    assert (root / 'run.log').read_text() == log_before
    assert not any(r.where for r in results)  # no stage was sent to Dask

    # a param flip and back: the second time DVC restores the stage from its run-cache
    params = yaml.safe_load((root / 'params.yaml').read_text())
    original = (root / 'params.yaml').read_text()
    (root / 'params.yaml').write_text(yaml.safe_dump({**params, 'seeds': [5]}, sort_keys=False))
    assert outcomes(run_pipeline(root, targets=['prepare'])) == {'prepare': 'ran'}
    (root / 'params.yaml').write_text(original)
    log_before = (root / 'run.log').read_text()
    assert outcomes(run_pipeline(root, targets=['prepare'])) == {'prepare': 'restored'}
    assert (root / 'run.log').read_text() == log_before

    # dvc.lock lost: every stage, training ones too, restored from the run-cache, and a
    # leftover work dir of a training stage is removed (its outputs are final); `report`, whose
    # outputs DVC does not cache, too: a preset's worktree ran every evaluation again
    stale = root / 'work_dirs' / 'train-small-000000000000'
    stale.mkdir(parents=True)
    (root / 'dvc.lock').unlink()
    (root / 'reports' / 'results.md').unlink()
    results = run_pipeline(root, targets=['report'], jobs=2)
    assert outcomes(results) == {s: 'restored' for s in demo.STAGES if s != 'lonely'}
    assert (root / 'run.log').read_text() == log_before
    assert not stale.exists()
    for path in ('data/left.txt', 'models/small.txt', 'models/large.txt', 'reports/results.md', 'metrics.json'):
        assert (root / path).read_bytes() == two_jobs['outputs'][path], path


def test_failures_stop_their_downstream_only(tmp_path):
    """`right` fails in the workspace (`exit 3`), the train@* stages on their workers (exit 4)."""
    root = demo.make_project(tmp_path / 'proj', fail='right', fail_training='train@small')
    results = run_pipeline(root, jobs=2)
    assert outcomes(results) == {
        'prepare': 'ran',
        'left': 'ran',
        'right': 'failed',
        'train@small': 'failed',
        'train@large': 'failed',
        'report': 'not run',
        'lonely': 'ran',
    }
    by_stage = {r.stage: r for r in results}
    right = by_stage['right']
    assert right.exit_code not in (None, 0) and right.message.startswith("ERROR: failed to reproduce 'right'")
    assert 'exited with 3' in right.message  # DVC's own words: `right` says nothing itself
    train = by_stage['train@small']
    assert train.exit_code not in (None, 0) and train.where  # on a worker
    assert train.message == 'error [train@small]: training diverged: loss inf at iteration 1'  # its cause
    assert any('exited with 4' in line for line in train.output)
    assert by_stage['report'].message == 'an upstream stage did not complete'
    assert sorted(demo.commands_run(root)) == ['left', 'lonely', 'prepare', 'train@large', 'train@small']


def test_force_reruns_and_clears_work_dirs(tmp_path):
    root = demo.make_project(tmp_path / 'proj')
    assert outcomes(run_pipeline(root, targets=['lonely'])) == {'lonely': 'ran'}
    stale = root / 'work_dirs' / 'lonely-000000000000'
    stale.mkdir(parents=True)
    assert outcomes(run_pipeline(root, targets=['lonely'], force=True)) == {'lonely': 'ran'}
    assert demo.commands_run(root) == ['lonely', 'lonely']
    assert not stale.exists()
