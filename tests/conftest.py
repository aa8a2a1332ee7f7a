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
