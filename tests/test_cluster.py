"""The flow against a real Dask cluster over loopback (tests/loopback.py), where things go wrong:

* a worker killed (SIGKILL, as a lost node) during a training: Dask reruns the stage on the
  other worker, which resumes from the last verified checkpoint; the killed worker's stage
  processes end with it (flows/reaper.py);
* no scheduler at the address, or a scheduler with no worker: the flow fails within the stated
  timeout, with one error line naming the address, and writes nothing.

Each trains the smoke preset's weak teacher (`teacher@tiny-weak`, upstream: `data`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import loopback
import psutil
import pytest
from support import copy_project, env, preset_params
from test_interrupt import verified_checkpoint, wait_for

pytestmark = pytest.mark.timeout(900)

STAGE = 'teacher@tiny-weak'
FLOW = [sys.executable, '-m', 'flows', '--no-experiment', '--target', STAGE]


def project(tmp_path: Path, iters: int = 120, interval: int = 4) -> Path:
    params = preset_params('smoke')
    params['pairs']['tiny']['weak']['iters'] = iters
    params['train']['checkpoint_interval'] = interval
    return copy_project(tmp_path / 'project', params=params)


def start_flow(root: Path, log: Path, *args: str) -> subprocess.Popen:
    with log.open('wb') as out:
        return subprocess.Popen(
            [*FLOW, *args], cwd=root, env=env(PYTHONPATH=str(root)), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def test_a_worker_killed_mid_training_the_stage_resumes_on_the_other(tmp_path):
    root = project(tmp_path)
    log = tmp_path / 'flow.log'
    with loopback.cluster(tmp_path / 'dask', workers=2) as dask:
        addresses = dask.wait_for_workers(2)
        watch = loopback.TrainingWatch(root, dask.workers)
        flow = start_flow(root, log, '--scheduler', dask.address)
        try:
            checkpoint = wait_for('verified checkpoint', lambda: verified_checkpoint(root), flow, log)
            running = wait_for('the training under a worker', lambda: watch.running(), flow, log, timeout=10)
            (pid, victim), *_ = running.items()
            dask.workers[victim].send_signal(signal.SIGKILL)  # the node is gone: no clean-up of its own
            survivor = next(name for name in addresses if name != victim)
            assert flow.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            loopback.end(flow)
    out = log.read_text()
    resumed = [line for line in out.splitlines() if 'resuming from iter_' in line]
    assert resumed, out[-4000:]  # dfmsd.engine.training, on the survivor
    done = int(checkpoint[5:-4])
    assert int(resumed[-1].rsplit('iter_', 1)[1].split('.')[0]) >= done, resumed
    assert f'| `{STAGE}` | ran |' in out and addresses[survivor] in out.split(f'| `{STAGE}` |')[-1].splitlines()[0]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # ended with its worker
    assert (root / 'models/teachers/tiny/weak/model.pth').is_file()


def assert_fails_fast(res: subprocess.CompletedProcess, seconds: float, limit: float, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-4000:]
    assert seconds < limit, seconds
    errors = [line for line in out.splitlines() if line.startswith('error [flow]: ')]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), (errors, out[-4000:])


def run_flow(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    res = subprocess.run([*FLOW, *args], cwd=root, env=env(PYTHONPATH=str(root)), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    return res, time.monotonic() - began


def test_no_scheduler_at_the_address_fails_within_the_timeout_naming_it(tmp_path):
    root = project(tmp_path)
    address = f'tcp://127.0.0.1:{loopback.free_port()}'  # nothing listens there
    res, seconds = run_flow(root, '--scheduler', address, '--connect-timeout', '5')
    assert_fails_fast(res, seconds, 60, 'no Dask scheduler answers at', address, 'within 5 s')
    assert not (root / 'dvc.lock').exists() and not (root / 'data/dataset.json').exists()  # nothing ran


def test_a_scheduler_without_workers_fails_within_the_timeout_naming_it(tmp_path):
    root = project(tmp_path)
    with loopback.cluster(tmp_path / 'dask', workers=0) as dask:
        res, seconds = run_flow(root, '--scheduler', dask.address, '--connect-timeout', '5')
    assert_fails_fast(res, seconds, 60, f'the Dask scheduler at {dask.address} has no worker', 'waited 5 s')
    assert not (root / 'dvc.lock').exists()


def _stage_until_stopped(event_name: str) -> tuple[int, float]:
    """On a worker: a stage process under the run's stop event; its exit status and how long it ran."""
    from flows import engine, guard

    with engine._ending_on(event_name):
        proc = guard.start_stage_process([sys.executable, '-c', 'import time; time.sleep(120)'])
        started = time.monotonic()
        try:
            return proc.wait(timeout=60), time.monotonic() - started
        finally:
            guard.forget(proc)


def test_the_runs_stop_event_ends_a_workers_stage_processes():
    """What an interrupted flow sets (flows.engine.stop_workers) reaches a running task's processes."""
    import cloudpickle
    from distributed import Client, Event, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker process cannot import tests/
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        future = client.submit(_stage_until_stopped, 'test-run-stop')
        time.sleep(3)
        Event('test-run-stop', client=client).set()
        status, ran = future.result(timeout=90)
    assert status != 0 and ran < 30, (status, ran)


def _stage_env_on_worker() -> tuple[str | None, str | None]:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flows import stages

    code = 'import os; print(os.environ.get("MALLOC_TRIM_THRESHOLD_"))'
    env = stages.subprocess_env(Path.cwd())
    seen = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    return os.environ.get('MALLOC_TRIM_THRESHOLD_'), seen.stdout.strip()


def test_a_stage_command_on_a_dask_worker_does_not_inherit_the_nannys_malloc_trim():
    """Dask's nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536; a training that inherited
    it faulted its freed memory in again (benchmarks/stage_env.sh: 18x the minor faults, 8x the system time)."""
    import cloudpickle

    from flows import engine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker process cannot import tests/
    with engine.cluster(None, jobs=1) as client:
        worker, stage = client.submit(_stage_env_on_worker, pure=False).result(timeout=120)
    assert worker == '65536'  # what the nanny set for the worker itself
    assert stage == 'None'


def _periodic_on_worker(keys: list[str]) -> tuple[list[str], dict]:
    import dask
    from distributed import get_worker

    profiling = [name for name in get_worker().periodic_callbacks if name.startswith('profile')]
    return profiling, {key: dask.config.get(key) for key in keys}


def test_the_local_clusters_workers_run_without_dasks_profiler_and_with_slower_checks():
    """Dask's profiler samples each worker's threads 100 times a second, its health tick and
    monitors run 50, 10 and 2 times a second, on the CPU the trainings beside them use
    (benchmarks/cluster_idle.py); the local cluster's workers get neither."""
    import cloudpickle

    from flows import engine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker process cannot import tests/
    with engine.cluster(None, jobs=1) as client:
        keys = sorted(engine.LOCAL_CLUSTER_CONFIG)
        profiling, config = client.submit(_periodic_on_worker, keys, pure=False).result(timeout=120)
    assert profiling == []
    assert config == {key: engine.LOCAL_CLUSTER_CONFIG[key] for key in keys}
