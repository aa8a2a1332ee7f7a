"""Helpers the tests share (imported explicitly; conftest.py holds fixtures only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
#: Outputs of the committed default run, which a copy of the project must not start with.
RESULTS = ('dvc.lock', 'metrics/', 'logs/', 'reports/')


def env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess in a project copy: this interpreter first on PATH."""
    out = dict(os.environ, DVC_NO_ANALYTICS='1', PREFECT_SERVER_ANALYTICS_ENABLED='false', **extra)
    out['PATH'] = VENV_BIN + os.pathsep + out.get('PATH', '')
    return out


def run(cmd: list[str], cwd: Path, *, check: bool = True, timeout: float = 1800, **extra_env: str):
    """Run ``cmd`` in ``cwd``; on an unexpected exit code, fail with its output."""
    res = subprocess.run(
        cmd, cwd=cwd, env=env(PYTHONPATH=str(cwd), **extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise AssertionError(f'{cmd} exited with {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}')
    return res


def copy_project(dest: Path, *, params: dict | None = None) -> Path:
    """The working tree's tracked and untracked-not-ignored files (minus committed results)
    as a fresh git + DVC repository at ``dest``; ``params`` replaces params.yaml."""
    files = (
        subprocess.run(
            ['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split('\0')
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(('tests/', *RESULTS)):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if params is not None:
        import yaml

        (dest / 'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    git = ['git', '-c', 'user.email=test@dfmsd', '-c', 'user.name=test']
    subprocess.run(['git', 'init', '-q'], cwd=dest, check=True)
    subprocess.run(git + ['add', '-A'], cwd=dest, check=True)
    subprocess.run(git + ['commit', '-qm', 'copy'], cwd=dest, check=True)
    return dest


def preset_params(name: str) -> dict:
    """params.yaml with presets/<name>.yaml merged, as the preset runner writes it."""
    from dfmsd.core.presets import preset_params as merged

    return merged(name, REPO / 'params.yaml', REPO / 'presets')
