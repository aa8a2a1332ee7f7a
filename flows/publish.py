"""Copy a finished preset run's report into the repository, with the commit it ran at.

    python -m flows.publish NAME        (what `make publish PRESET=NAME` runs)

A preset runs in ``.presets/<name>/`` (:mod:`flows.presets`), which git ignores, so its report
is not part of a commit. This copies it to ``reports/presets/<name>/`` for a reviewer:

* ``reports/``' files as the preset's ``report`` (and ``figures``) stages wrote them;
* ``params.merged.yaml``: the params the run used (params.yaml with the preset merged);
* ``preset-dvc.lock``: the run's DVC lock, every dependency's and output's md5 (renamed, so
  that DVC does not take it for a pipeline's lock);
* ``RUN.md``: the commit, and the command that reruns it.

It refuses, and writes nothing, unless every stage of the preset's pipeline is up to date in
the worktree (``dvc status``: the run is complete), and the worktree's code is its commit's (a run that
carried uncommitted changes of the workspace has no commit to name). The copy replaces the old
one as a whole (:func:`dfmsd.core.io.atomic_directory`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dfmsd.core.errors import DfmsdError
from dfmsd.core.io import atomic_directory, write_text
from flows import guard
from flows.presets import OWN_OUTPUTS, _git, preset_dir

PUBLISHED = Path('reports') / 'presets'
EXIT_CODE = 2


class PublishError(DfmsdError):
    """The preset's run cannot be published as it is."""


def _pipeline_state(tree: Path) -> tuple[list[str], list[str]]:
    """DVC's view of ``tree``: the stages that are not up to date (its status of the whole
    pipeline), and the paths of every stage's outputs, relative to ``tree``."""
    from dvc.repo import Repo

    with Repo(str(tree)) as repo:
        outs = [str(Path(out.fs_path).relative_to(tree)) for out in repo.index.outs]
        return sorted(repo.status()), outs


def _not_in_commit(tree: Path, outs: list[str]) -> list[str]:
    """Files of ``tree`` that differ from its commit (git status), other than the run's own
    outputs, its merged params.yaml and the .gitignore entries DVC writes for outputs."""
    mine = (*OWN_OUTPUTS, 'params.yaml', *outs)
    out = []
    for line in _git('status', '--porcelain', '--untracked-files=all', cwd=tree).splitlines():
        path = line[3:]
        if Path(path).name == '.gitignore' or any(path == o or path.startswith(f'{o}/') for o in mine):
            continue
        out.append(line)
    return out


def publish(repo_root: str | Path, name: str) -> Path:
    """Copy the preset's finished report to ``reports/presets/<name>/``; returns that folder."""
    root = Path(repo_root).resolve()
    tree = preset_dir(root, name)  # a bad name raises here
    if not (tree / '.git').exists() or not (tree / 'reports' / 'results.md').is_file():
        raise PublishError(f'preset {name!r} has no report in {tree}: run `make repro PRESET={name}` first')
    with guard.workspace(tree):  # not while a run of the preset writes it
        stale, outs = _pipeline_state(tree)
        if stale:
            shown = ', '.join(stale[:5]) + (f' and {len(stale) - 5} more' if len(stale) > 5 else '')
            raise PublishError(
                f'preset {name!r} is not up to date in {tree} ({len(stale)} stage(s) changed: {shown}): '
                f'run `make repro PRESET={name}` first'
            )
        changed = _not_in_commit(tree, outs)
        if changed:
            raise PublishError(
                f'preset {name!r} ran with changes that are not in its commit ({", ".join(changed[:3])}): '
                f'commit them and run `make repro PRESET={name}` again'
            )
        commit = _git('rev-parse', 'HEAD', cwd=tree).strip()
        with atomic_directory(root / PUBLISHED / name) as out:
            shutil.copytree(tree / 'reports', out, dirs_exist_ok=True)
            shutil.copy2(tree / 'params.yaml', out / 'params.merged.yaml')
            shutil.copy2(tree / 'dvc.lock', out / 'preset-dvc.lock')
            write_text(
                out / 'RUN.md',
                f'# Preset `{name}`: one run\n\n'
                f'- Commit: `{commit}` (its code, params.yaml and `presets/{name}.yaml`).\n'
                f'- Rerun: `git checkout {commit} && make repro PRESET={name}`.\n'
                f'- `params.merged.yaml`: the params it ran with; `preset-dvc.lock`: its DVC lock (every '
                f"dependency's and output's md5); the rest: its `reports/`.\n"
                f'- Copied here by `make publish PRESET={name}`.\n',
            )
    return root / PUBLISHED / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m flows.publish', description=__doc__.splitlines()[0])
    parser.add_argument('preset', help='a preset of presets/ whose run in .presets/<name>/ is complete')
    parser.add_argument('--repo', default='.', help='the repository (default: .)')
    args = parser.parse_args(argv)
    try:
        out = publish(args.repo, args.preset)
    except DfmsdError as err:
        print(f'error [publish]: {err}', file=sys.stderr, flush=True)
        return EXIT_CODE
    print(f'[publish] {out.relative_to(Path(args.repo).resolve())}: {", ".join(sorted(p.name for p in out.iterdir()))}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
