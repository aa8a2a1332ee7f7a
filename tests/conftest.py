"""Shared fixtures: a tiny synthetic dataset and a project copy to run DVC in."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault('DVC_NO_ANALYTICS', '1')


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> Path:
    """24 train / 8 val images of 64 px, made once per session."""
    from dfmsd.data import generate_dataset
    root = tmp_path_factory.mktemp('tiny') / 'synthetic'
    generate_dataset(root, num_train=24, num_val=8, image_size=64, seed=1, progress=False)
    return root


def copy_project(dest: Path) -> Path:
    """The working tree's tracked and untracked-not-ignored files, as a fresh git+DVC repo."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split('\0')
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(('tests/', 'reports/', 'metrics/', 'logs/')) \
                and rel != 'dvc.lock':
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(['git', 'init', '-q'], cwd=dest, check=True)
    subprocess.run(['git', 'add', '-A'], cwd=dest, check=True)
    subprocess.run(['git', '-c', 'user.email=t@t', '-c', 'user.name=t', 'commit', '-qm', 'copy'],
                   cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _dvc_env(tmp_path_factory):
    """No DVC analytics; DVC's site cache (index, state DBs) under the test's tmp dir."""
    saved = {k: os.environ.get(k) for k in ("DVC_NO_ANALYTICS", "DVC_SITE_CACHE_DIR")}
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server (sqlite) for the session, its URL in PREFECT_API_URL."""
    from prefect.testing.utilities import prefect_test_harness

    # no network: the server's telemetry heartbeat would only log sqlite lock errors
    saved = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = saved


def run_flow(root: Path, **kwargs):
    """Run the flow; return its final state and its task runs by name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.pipeline import dvc_pipeline  # noqa: PLC0415

    state = dvc_pipeline(repo_dir=str(root), return_state=True, **kwargs)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        # limit/sort given explicitly: prefect 3.8.8's sync client sends null for them
        # otherwise, which its own server rejects (422)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    by_name = {tr.name: tr for tr in task_runs}
    assert len(by_name) == len(task_runs), f"task run names not unique: {[t.name for t in task_runs]}"
    return state, by_name




@pytest.fixture(autouse=True)
def _own_mmengine_logger(request):
    """Prefect's logging set-up (logging.config.dictConfig) closes every existing handler,
    including the file handler of an earlier in-process Runner's MMLogger, which mmengine
    keeps as the current logger and writes to in init_weights(). Each test gets its own."""
    from mmengine.logging import MMLogger
    MMLogger.get_instance(f'test:{request.node.nodeid}', log_level='WARNING')
