"""The review's comparison (:mod:`flows.review`): the commit's metrics files (``git show
HEAD:<path>``) against the workspace's, byte for byte, and what differs in those that do not
match; also the review's ``git`` and its set-up error.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dfmsd.core.errors import DfmsdError
from dfmsd.core.params import read_yaml

#: What the verdict compares: every metrics file in git.
METRICS_DIR = 'metrics'
SUMMARY = 'reports/summary.json'


class ReviewError(Exception):
    """A set-up problem the reviewer must fix (exit status 2)."""


def git(root: Path, *args: str, text: bool = True) -> str | bytes:
    res = subprocess.run(['git', *args], cwd=root, capture_output=True, text=text)
    if res.returncode != 0:
        err = res.stderr if text else res.stderr.decode(errors='replace')
        raise ReviewError(f'`git {" ".join(args)}` failed: {err.strip()}')
    return res.stdout


def is_metrics_file(path: str) -> bool:
    return path == SUMMARY or (path.startswith(f'{METRICS_DIR}/') and path.endswith('.json'))


def committed_metrics(root: Path) -> list[str]:
    listed = git(root, 'ls-tree', '-r', '-z', '--name-only', 'HEAD', '--', METRICS_DIR, SUMMARY)
    return sorted(p for p in listed.split('\0') if p and is_metrics_file(p))


def workspace_metrics(root: Path) -> list[str]:
    found = [p.relative_to(root).as_posix() for p in (root / METRICS_DIR).rglob('*.json') if p.is_file()]
    return sorted(found + ([SUMMARY] if (root / SUMMARY).is_file() else []))


def _leaves(value, prefix: str = '') -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_leaves(item, f'{prefix}.{key}' if prefix else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_leaves(item, f'{prefix}[{i}]'))
        return out
    return {prefix: value}


def describe_difference(old: bytes, new: bytes, limit: int = 3) -> str:
    """The first few keys whose values differ (JSON), or the sizes."""
    try:
        a, b = _leaves(json.loads(old)), _leaves(json.loads(new))
    except ValueError:
        return f'{len(old)} bytes committed, {len(new)} bytes now'
    keys = [k for k in {**a, **b} if a.get(k, '(absent)') != b.get(k, '(absent)')]
    if not keys:
        return 'same values, different bytes (formatting)'
    shown = ', '.join(f'{k}: {a.get(k, "(absent)")} -> {b.get(k, "(absent)")}' for k in keys[:limit])
    return shown + (f' (+{len(keys) - limit} more)' if len(keys) > limit else '')


def compare_metrics(root: Path) -> tuple[list[str], list[str], dict[str, bytes]]:
    """(identical files, one line per file missing or new, the committed bytes of every file that
    differs)."""
    committed, present = committed_metrics(root), workspace_metrics(root)
    same, absent, changed = [], [], {}
    for path in sorted(set(committed) | set(present)):
        if path not in present:
            absent.append(f'{path}: missing (the commit has it)')
        elif path not in committed:
            absent.append(f'{path}: not in the commit')
        else:
            old = git(root, 'show', f'HEAD:{path}', text=False)
            if old == (root / path).read_bytes():
                same.append(path)
            else:
                changed[path] = old
    return same, absent, changed


def reported_split(root: Path) -> str:
    try:
        return str((read_yaml(root / 'params.yaml').get('report') or {}).get('split') or 'test')
    except DfmsdError:
        return 'test'
