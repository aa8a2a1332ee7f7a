"""Run a preset in its own git worktree, so that the repository's files stay as they are.

    python -m flows --preset NAME [--jobs 2] [--target STAGE ...]    (what `make repro PRESET=NAME` runs)

``presets/<name>.yaml`` is merged over params.yaml (:mod:`dfmsd.core.presets`) and checked
before anything is written. The run happens in ``.presets/<name>/``, a git worktree of the
current commit that also carries the workspace's uncommitted changes, and that shares the
repository's DVC cache (so identical stages are restored, not rerun). Its outputs (models,
dvc.lock, reports) stay there, resumable; the repository's own params.yaml, dvc.lock,
metrics and reports are never touched. When the run completes it is recorded as a DVC
experiment (``dvc exp save``, :func:`flows.results.save_experiment`), so ``dvc exp show``
lists it beside the committed results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from dfmsd.core.presets import WORKTREES, preset_params
from flows import guard

#: What a preset's own runs write into tracked files; kept when its worktree is refreshed.
OWN_OUTPUTS = ('dvc.lock', 'metrics', 'logs', 'reports')


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def preset_worktree(repo_root: str | Path, name: str) -> Path:
    """``.presets/<name>``: the current commit + the workspace's changes + the preset's params."""
    root = Path(repo_root).resolve()
    params = preset_params(name, root / 'params.yaml', root / 'presets')  # errors before any write
    tree = root / WORKTREES / name
    head = _git('rev-parse', 'HEAD', cwd=root).strip()
    if not (tree / '.git').exists():
        tree.parent.mkdir(exist_ok=True)
        _git('worktree', 'prune', cwd=root)
        _git('worktree', 'add', '--detach', '--force', str(tree), head, cwd=root)
        # It starts with none of the committed results: they are the default params', and a
        # report (or a failed run's artifacts) would show them as the preset's. DVC restores
        # what the preset shares with them from its run-cache.
        for rel in _git('ls-files', '-z', '--', *OWN_OUTPUTS, cwd=tree).split('\0'):
            if rel:
                (tree / rel).unlink(missing_ok=True)
    else:  # keep its outputs, work dirs and DVC state: a rerun resumes and skips what is done
        with tempfile.TemporaryDirectory() as keep:
            for rel in OWN_OUTPUTS:
                if (tree / rel).exists():
                    (shutil.copytree if (tree / rel).is_dir() else shutil.copy2)(tree / rel, Path(keep) / rel)
            try:
                _git('checkout', '--detach', '--force', head, cwd=tree)
                _git('reset', '--hard', head, cwd=tree)
            finally:  # also when git was stopped half-way: the outputs are the preset's own
                for rel in OWN_OUTPUTS:
                    if (Path(keep) / rel).exists():
                        if (tree / rel).is_dir():
                            shutil.rmtree(tree / rel)
                        (shutil.copytree if (Path(keep) / rel).is_dir() else shutil.copy2)(Path(keep) / rel, tree / rel)
    changed = _git('ls-files', '-z', '--modified', '--others', '--exclude-standard', cwd=root).split('\0')
    deleted = set(_git('ls-files', '-z', '--deleted', cwd=root).split('\0'))
    # The workspace's own results (e.g. an uncommitted default run) are not the preset's.
    own = tuple(f'{rel}/' for rel in OWN_OUTPUTS)
    for rel in filter(None, changed):
        if rel in deleted or rel.startswith(f'{WORKTREES}/') or rel in OWN_OUTPUTS or rel.startswith(own):
            continue
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, tree / rel)
    for rel in filter(None, deleted):
        if rel not in OWN_OUTPUTS and not rel.startswith(own):
            (tree / rel).unlink(missing_ok=True)
    (tree / 'params.yaml').write_text(
        f'# params.yaml with presets/{name}.yaml merged (flows.presets); '
        f"the repository's own params.yaml is unchanged\n" + yaml.safe_dump(params, sort_keys=False, width=110)
    )
    subprocess.run(
        [sys.executable, '-m', 'dvc', 'config', '--local', 'cache.dir', str(root / '.dvc' / 'cache')],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    return tree


@contextmanager
def preset_run(repo_root: str | Path, name: str) -> Iterator[Path]:
    """The preset's worktree (:func:`preset_worktree`), refreshed and then held for the block:
    its workspace lock (``.presets/<name>.lock``, :func:`flows.guard.workspace`) is taken
    before the refresh; raises :class:`flows.guard.WorkspaceBusy` if another run holds it."""
    with guard.workspace(preset_dir(repo_root, name)):
        with guard.deferred():  # a signal waits until the worktree's files are all in place
            tree = preset_worktree(repo_root, name)
        yield tree


def preset_dir(repo_root: str | Path, name: str) -> Path:
    """``.presets/<name>`` (the workspace :func:`flows.guard.workspace` locks) of a valid preset:
    a bad name or preset raises before any file is written, the lock file's included."""
    root = Path(repo_root).resolve()
    preset_params(name, root / 'params.yaml', root / 'presets')
    return root / WORKTREES / name
