"""scripts/build_mmcv.sh's path handling, on a tiny stand-in for mmcv's sdist.

A fresh machine (no cached wheel) is the only one that runs the build; a relative interpreter
path (`.venv/bin/python`, what scripts/setup_env.sh passes) once broke it there, because the
build runs that interpreter from inside the unpacked sdist. The real compile is what `.ci/run`
does on every run (with an empty wheelhouse); this test checks the script's own logic in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support import REPO

pytestmark = pytest.mark.fast

STAND_IN_SETUP = """\
from setuptools import setup
# mmcv's setup.py names an older C++ standard, which build_mmcv.sh rewrites to C++20
EXTRA_COMPILE_ARGS = ['-std=c++14']
setup(name='mmcv', version='2.1.0', py_modules=['mmcv_stand_in'])
"""


def stand_in_sdist(directory: Path) -> Path:
    """``mmcv-2.1.0.tar.gz`` holding a setup.py that builds a pure-Python wheel in a second."""
    src = directory / 'src' / 'mmcv-2.1.0'
    src.mkdir(parents=True)
    (src / 'setup.py').write_text(STAND_IN_SETUP)
    (src / 'mmcv_stand_in.py').write_text('')
    sdist = directory / 'mmcv-2.1.0.tar.gz'
    with tarfile.open(sdist, 'w:gz') as tar:
        tar.add(src, arcname='mmcv-2.1.0')
    return sdist


def test_the_build_takes_relative_paths_for_the_interpreter_the_wheelhouse_and_the_sdist(tmp_path):
    stand_in_sdist(tmp_path)
    # the interpreter as setup_env.sh passes it: a path relative to the caller's directory, through
    # a venv's link (resolving it would leave the venv)
    (tmp_path / 'venv').symlink_to(Path(sys.prefix))
    python = Path('venv') / Path(sys.executable).relative_to(sys.prefix)
    res = subprocess.run(
        ['bash', str(REPO / 'scripts/build_mmcv.sh'), 'build', str(python), 'wheelhouse', 'mmcv-2.1.0.tar.gz'],
        cwd=tmp_path,
        env=dict(os.environ, FORCE_CUDA='0', MAX_JOBS='1'),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = sorted(p.name for p in (tmp_path / 'wheelhouse').iterdir())
    assert len(wheels) == 1 and wheels[0].startswith('mmcv-2.1.0-'), wheels
    assert '[build_mmcv] built' in res.stdout and 'key cpu' in res.stdout
