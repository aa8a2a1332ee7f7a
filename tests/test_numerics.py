"""dfmsd.core.numerics: the code paths a stage pins, and what its run record says about them."""

from __future__ import annotations

import os
import platform

import pytest

from dfmsd.core import numerics

pytestmark = pytest.mark.fast


def settings_after_pin(monkeypatch, machine: str, mode: str | None = None) -> dict[str, str | None]:
    """The three settings after ``pin()`` on a CPU reported as ``machine``, starting from a
    user's own values (monkeypatch restores this process's environment afterwards)."""
    monkeypatch.setattr(platform, 'machine', lambda: machine)
    for key in numerics.PINNED:
        monkeypatch.setenv(key, 'a value of the user')
    if mode:
        monkeypatch.setenv(numerics.MODE_ENV, mode)
    else:
        monkeypatch.delenv(numerics.MODE_ENV, raising=False)
    numerics.pin()
    return {key: os.environ.get(key) for key in numerics.PINNED}


def test_a_stage_on_x86_64_runs_the_avx2_paths_of_all_three_libraries(monkeypatch):
    assert settings_after_pin(monkeypatch, 'x86_64') == {
        'ATEN_CPU_CAPABILITY': 'avx2',
        'ONEDNN_MAX_CPU_ISA': 'AVX2',
        'MKL_CBWR': 'AVX2,STRICT',
    }
    assert numerics.machine()['numerics'] == 'pinned'


def test_native_mode_and_other_cpus_leave_the_libraries_to_choose(monkeypatch):
    assert settings_after_pin(monkeypatch, 'x86_64', 'native') == dict.fromkeys(numerics.PINNED)
    assert settings_after_pin(monkeypatch, 'arm64') == dict.fromkeys(numerics.PINNED)
    assert numerics.machine()['numerics'] == 'native (arm64: nothing to pin)'


def test_a_mode_that_is_neither_is_refused(monkeypatch):
    monkeypatch.setenv(numerics.MODE_ENV, 'fast')
    with pytest.raises(ValueError, match='DFMSD_NUMERICS=.fast.: use pinned'):
        numerics.pin()


@pytest.mark.skipif(not numerics.pinnable(), reason='nothing is pinned on this CPU')
def test_this_process_runs_the_code_paths_of_the_stages():
    import torch

    # tests/conftest.py pins before the first tensor operation, as dfmsd.core.cli does for a stage
    assert torch.backends.cpu.get_cpu_capability() == 'AVX2'
