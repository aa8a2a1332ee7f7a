"""Fixtures only (shared helpers live in tests/support.py). Nothing here changes the process
environment for other tests (but the numeric code paths below, which every stage pins too):
each test that needs a variable sets it with monkeypatch."""

from __future__ import annotations

import shutil

import pytest
from support import copy_project, preset_params

from dfmsd.core import numerics

# The code paths every stage runs with (dfmsd.core.numerics), set before any test's first tensor
# operation, so that what a test computes in this process is what a stage computes.
numerics.pin()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No DVC analytics; DVC's site cache (index, state) under the session's tmp dir."""
    monkeypatch.setenv('DVC_NO_ANALYTICS', '1')
    monkeypatch.setenv('DVC_SITE_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'dvc-site-cache'))
    monkeypatch.setenv('PREFECT_SERVER_ANALYTICS_ENABLED', 'false')


@pytest.fixture(autouse=True)
def _own_mmengine_logger(request):
    """Prefect's logging set-up (dictConfig) closes every existing handler, including the file
    handler of an earlier in-process Runner's MMLogger, which mmengine keeps as the current
    logger. Each test gets its own."""
    from mmengine.logging import MMLogger

    MMLogger.get_instance(f'test:{request.node.nodeid}', log_level='WARNING')


@pytest.fixture(scope='session')
def _tiny_dataset_master(tmp_path_factory):
    from dfmsd.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp('tiny') / 'synthetic'
    splits = {s: (f'annotations/instances_{s}.json', f'{s}/', n) for s, n in (('train', 24), ('val', 8), ('test', 8))}
    generate_dataset(root, splits, image_size=64, seed=1, progress=False)
    return root


@pytest.fixture
def tiny_dataset(_tiny_dataset_master, tmp_path):
    """A private copy of a 24/8/8-image, 64 px synthetic dataset (made once per session)."""
    return shutil.copytree(_tiny_dataset_master, tmp_path / 'synthetic')


@pytest.fixture
def smoke_project(tmp_path):
    """A fresh git + DVC copy of the project with the smoke preset's params."""
    return copy_project(tmp_path / 'project', params=preset_params('smoke'))


@pytest.fixture(scope='session')
def prefect_api():
    """A temporary Prefect server (sqlite) for the session, its URL in PREFECT_API_URL."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('PREFECT_SERVER_ANALYTICS_ENABLED', 'false')
        with prefect_test_harness(server_startup_timeout=120):
            yield
