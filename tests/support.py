"""Helpers the tests share (imported explicitly; conftest.py holds fixtures only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
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


def set_key(path: str, value) -> Callable[[dict], None]:
    """An edit of a params dict: ``path`` (dotted) set to ``value``."""
    *parents, last = path.split('.')

    def change(params: dict) -> None:
        node = params
        for key in parents:
            node = node[key]
        node[last] = value

    return change


# ---------------------------------------------------------------- tiny models on the tiny dataset
SMALL = dict(depth=18, width=8, fpn_channels=16)  # the tiny detectors' backbone and FPN widths
SIZE = 64  # px: the tiny dataset's images and training size


def tiny_data(root: Path):
    """The ``data`` params of the tiny dataset (conftest's ``tiny_dataset``) at ``root``."""
    from dfmsd.core.params import Data

    return Data(
        root=str(root),
        generate=False,
        image_size=SIZE,
        splits={s: dict(ann=f'annotations/instances_{s}.json', img=f'{s}/') for s in ('train', 'val', 'test')},
    )


def small(detector: str):
    """``configs/small/<detector>.py`` at the tiny widths."""
    from dfmsd.core.params import Detector

    return Detector(config=str(REPO / 'configs' / 'small' / f'{detector}.py'), **SMALL)
