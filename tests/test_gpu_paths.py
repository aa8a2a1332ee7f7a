"""GPU-only failure modes found by running the pipeline on a GPU (issue 14, docs/gpu.md),
checked here on the CPU."""

from __future__ import annotations

import os

import pytest
from mmengine.config import Config

pytestmark = pytest.mark.fast


@pytest.mark.parametrize('deterministic', [True, False])
def test_build_runner_allows_deterministic_cublas(monkeypatch, deterministic):
    """mmengine's randomness.deterministic calls torch.use_deterministic_algorithms(True); on a
    GPU every cuBLAS call (GFL's integral, DMKD's SE block) then raises unless
    CUBLAS_WORKSPACE_CONFIG is set before the runner is built."""
    import dfmsd.engine.runner as runner_mod

    built = []
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    monkeypatch.setattr(
        runner_mod.ConciseRunner,
        'from_cfg',
        classmethod(lambda cls, cfg: built.append(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))),
    )
    runner_mod.build_runner(Config(dict(randomness=dict(seed=0, deterministic=deterministic))))
    assert built == ([':4096:8'] if deterministic else [None])


def test_build_runner_keeps_a_users_cublas_setting(monkeypatch):
    import dfmsd.engine.runner as runner_mod

    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':16:8')
    monkeypatch.setattr(runner_mod.ConciseRunner, 'from_cfg', classmethod(lambda cls, cfg: None))
    runner_mod.build_runner(Config(dict(randomness=dict(seed=0, deterministic=True))))
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':16:8'
