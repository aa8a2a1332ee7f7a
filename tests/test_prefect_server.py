"""End to end: `prefect server start`, the deployment of flows/serve.py, runs started from it.

What `make ui` + `make serve` + *Run* in the UI do: a real Prefect server on a free port of
127.0.0.1 (own PREFECT_HOME and sqlite database under tmp_path), `python -m flows.serve`
against it for the demo DVC project, then flow runs created from the deployment with
parameters (a target; a preset) over the REST API, as the UI does, waited for, and their
task runs, logs and experiments read back. Every process started here is terminated at
teardown (SIGTERM, then SIGKILL), whatever happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dvc_demo as demo
import httpx
import pytest
from support import REPO

from flows.results import SUMMARY_KEY

HEALTH_TIMEOUT_S = 90
RUN_TIMEOUT_S = 180
DEPLOYMENT = 'dvc-pipeline/dfmsd'

pytestmark = pytest.mark.timeout(400)


class Api(httpx.Client):
    """The REST API, retrying what the server answers 503 (retryable, e.g. a busy sqlite
    database), as Prefect's own client does."""

    def request(self, method, url, **kwargs) -> httpx.Response:
        for _ in range(30):
            response = super().request(method, url, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1)
        return response


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the process and what it started), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone: anything left in its group gets the same signal once more
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
    proc.wait()


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith('PREFECT_')}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED='false',
        DVC_NO_ANALYTICS='1',
        PYTHONUNBUFFERED='1',
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
        **extra,
    )
    return env


def _start(cmd: list[str], env: dict, log_path: Path, cwd: Path) -> subprocess.Popen:
    with log_path.open('wb') as log:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait(what: str, check, proc: subprocess.Popen, log_path: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f'{what}: the process exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}')
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f'{what}: not after {timeout} s:\n{log_path.read_text()[-4000:]}')
        time.sleep(0.5)


@pytest.fixture
def prefect_server(tmp_path):
    """`python -m flows.ui` (`make ui`: `prefect server start`) on a free port of 127.0.0.1;
    yields its API URL."""
    port = _free_port()
    env = _env(tmp_path / 'server-home', PREFECT_API_DATABASE_CONNECTION_URL=f'sqlite+aiosqlite:///{tmp_path}/p.db')
    log_path = tmp_path / 'server.log'
    cmd = [sys.executable, '-m', 'flows.ui', '--host', '127.0.0.1', '--port', str(port)]  # what `make ui` runs
    proc = _start(cmd, env, log_path, tmp_path)
    api = f'http://127.0.0.1:{port}/api'
    try:
        _wait(
            'prefect server healthy',
            lambda: httpx.get(f'{api}/health', timeout=2).status_code == 200,
            proc,
            log_path,
            HEALTH_TIMEOUT_S,
        )
        yield api
    finally:
        _stop(proc)


@pytest.fixture
def served(prefect_server, tmp_path):
    """`python -m flows.serve --repo <demo project>` against the server; yields
    (API URL, project, deployment id)."""
    api = prefect_server
    root = demo.make_project(tmp_path / 'proj', presets={'tiny': {'seeds': [0, 7]}})
    env = _env(tmp_path / 'serve-home', PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY='1')
    log_path = tmp_path / 'serve.log'
    proc = _start([sys.executable, '-m', 'flows.serve', '--repo', str(root)], env, log_path, REPO)
    try:

        def deployment():
            response = httpx.get(f'{api}/deployments/name/{DEPLOYMENT}', timeout=5)
            return response.json()['id'] if response.status_code == 200 else None

        yield api, root, _wait('the deployment registered', deployment, proc, log_path, HEALTH_TIMEOUT_S), proc
    finally:
        _stop(proc)
    print(log_path.read_text()[-3000:])  # shown when the test fails


def test_runs_started_from_the_deployment(served, tmp_path):
    api, root, deployment_id, serve = served
    with Api(base_url=api, timeout=30) as http:
        deployment = http.get(f'/deployments/{deployment_id}').json()
        assert deployment['parameters']['repo_dir'] == str(root)
        schema = deployment['parameter_openapi_schema']['properties']
        assert {'preset', 'targets', 'jobs', 'retries', 'force'} <= set(schema)
        assert {'type': 'string', 'enum': ['tiny']} in schema['preset']['anyOf']  # the served repo's presets
        assert all(schema[name].get('description') for name in ('preset', 'targets', 'jobs', 'retries', 'force'))
        assert '<' not in deployment['description']  # the UI renders it as markdown (HTML swallowed `<name>`)

        # as the UI's "Custom run" does: one plain run, one of a preset; one at a time (global limit 1)
        params = [{'targets': ['lonely']}, {'preset': 'tiny', 'targets': ['prepare'], 'jobs': 1}]
        ids = []
        for p in params:
            response = http.post(f'/deployments/{deployment_id}/create_flow_run', json={'parameters': p})
            assert response.status_code == 201, response.text
            ids.append(response.json()['id'])

        def finished():
            runs = [http.get(f'/flow_runs/{i}').json() for i in ids]
            return (
                runs
                if all(r['state']['type'] in ('COMPLETED', 'FAILED', 'CRASHED', 'CANCELLED') for r in runs)
                else None
            )

        plain, preset = _wait('the flow runs finished', finished, serve, tmp_path / 'serve.log', RUN_TIMEOUT_S)
        for run in (plain, preset):
            assert run['state']['type'] == 'COMPLETED', run['state']
        assert preset['parameters']['preset'] == 'tiny' and preset['parameters']['repo_dir'] == str(root)
        first, second = sorted([when(r['start_time']), when(r['end_time'])] for r in (plain, preset))
        assert first[1] <= second[0], (first, second)  # the deployment's concurrency limit: one at a time

        for run, stage in ((plain, 'lonely'), (preset, 'prepare')):
            task_runs = http.post('/task_runs/filter', json={'flow_runs': {'id': {'any_': [run['id']]}}}).json()
            assert [(tr['name'], tr['state']['name']) for tr in task_runs] == [(stage, 'Completed')]

            def own_output(task_run_id=task_runs[0]['id'], stage=stage):
                logs = http.post('/logs/filter', json={'logs': {'task_run_id': {'any_': [task_run_id]}}, 'limit': 200})
                return any(f'[{stage}] done' in entry['message'] for entry in logs.json())

            # the stage's own output; Prefect sends logs in batches, which may land after the run's state
            _wait(f"{stage}'s own output in its task run's logs", own_output, serve, tmp_path / 'serve.log', 60)
            found = http.post('/artifacts/filter', json={'artifacts': {'flow_run_id': {'any_': [run['id']]}}}).json()
            assert SUMMARY_KEY in {a['key'] for a in found}

        # the UI is served next to the API
        assert http.get(api.removesuffix('/api') + '/').status_code == 200

    tree = root / '.presets' / 'tiny'
    assert (root / 'data' / 'lonely.txt').is_file() and (tree / 'data' / 'prepared' / 'a.txt').is_file()
    assert not (root / 'data' / 'prepared').exists()  # the preset's stage ran in its worktree only
    for where, prefix, run in ((root, 'flow', plain), (tree, 'tiny', preset)):
        listed = subprocess.run(
            [sys.executable, '-m', 'dvc', 'exp', 'show', '--json'],
            cwd=where,
            env=demo.dvc_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f'"{prefix}-{run["id"][:8]}"' in listed


def _preset_edges(name: str, tmp_path: Path) -> list[tuple[str, str]]:
    """(upstream, downstream) stage pairs of a preset's DVC pipeline, read by DVC from dvc.yaml
    and the preset's params in a scratch project (nothing is written to the repository)."""
    import shutil

    import yaml
    from dvc.repo import Repo

    from dfmsd.core.presets import preset_params

    scratch = tmp_path / f'{name}-shape'
    scratch.mkdir()
    shutil.copyfile(REPO / 'dvc.yaml', scratch / 'dvc.yaml')
    params = preset_params(name, REPO / 'params.yaml', REPO / 'presets')
    (scratch / 'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, '-m', 'dvc', 'init', '--no-scm', '-q'], cwd=scratch, check=True, env=demo.dvc_env())
    with Repo(str(scratch)) as repo:
        return [(up.name, down.name) for down, up in repo.index.graph.edges]


def test_the_run_graph_draws_each_direct_dependency_once(prefect_server, tmp_path):
    """The smoke grid's shape, run as a flow against `make ui`'s server: the graph endpoint
    lists each stage's direct upstream (the transitive reduction of DVC's dependencies), each
    once, so that the UI (which draws no arrows above 500 edges) draws them."""
    import networkx as nx

    edges = _preset_edges('smoke', tmp_path)
    direct = nx.transitive_reduction(nx.DiGraph(edges))
    # the grid's shape, not a count pinned to today's preset: the reduction drops arrows
    assert direct.number_of_edges() < len(edges), 'no transitive arrow left for the reduction to drop'
    root = demo.make_shaped_project(tmp_path / 'proj', edges)
    env = _env(tmp_path / 'flow-home', PREFECT_API_URL=prefect_server)
    cmd = [sys.executable, '-m', 'flows', '--repo', str(root), '--no-experiment']
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    with Api(base_url=prefect_server, timeout=30) as http:
        (run,) = http.post('/flow_runs/filter', json={}).json()
        assert run['name'] == f'default · {direct.number_of_nodes()} ran'
        graph = http.get(f'/flow_runs/{run["id"]}/graph-v2').json()
    label = {node['id']: node['label'].replace('-at-', '@') for _, node in graph['nodes']}
    drawn = [(label[p['id']], label[node['id']]) for _, node in graph['nodes'] for p in node['parents']]
    assert sorted(drawn) == sorted(direct.edges)  # each once: Prefect's own query repeats them
