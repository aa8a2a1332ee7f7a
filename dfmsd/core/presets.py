"""Presets: named overrides of params.yaml (``presets/<name>.yaml``), merged, never written back.

A preset is a partial params file. Mappings merge key by key; a mapping holding
``_replace: true`` replaces the whole mapping (e.g. a preset with other teachers). A preset
may start with ``extends: <other preset>``, merged first (e.g. each COCO table extends
``coco``). The merge result is validated against the schema. ``flows.presets`` runs a preset in its own git
worktree, so that the repository's params.yaml, dvc.lock and results stay as they are.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dfmsd.core.errors import ParamsError
from dfmsd.core.params import read_yaml, validate

PRESETS_DIR = Path('presets')
#: flows.presets runs a preset in ``.presets/<name>/``: its relative paths are read there.
WORKTREES = Path('.presets')


def deep_merge(base: dict[str, Any], override: dict[str, Any], *, keep_replace: bool = False) -> dict[str, Any]:
    """``override`` merged over ``base`` (neither is changed); ``_replace`` markers are consumed
    at any depth, or, with ``keep_replace`` (a preset merged over the preset it extends), kept
    for the final merge over params.yaml."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict):
            replace = bool(value.get('_replace'))
            body = {k: v for k, v in value.items() if k != '_replace'}
            start = merged.get(key) if isinstance(merged.get(key), dict) and not replace else {}
            merged[key] = deep_merge(start, body, keep_replace=keep_replace)
            if replace and keep_replace:
                merged[key] = {'_replace': True, **merged[key]}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def known_presets(presets_dir: str | Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(presets_dir).glob('*.yaml'))


def preset_overrides(
    name: str, presets_dir: str | Path = PRESETS_DIR, _seen: tuple = (), _extended_by: Path | None = None
) -> dict[str, Any]:
    """presets/<name>.yaml with the presets it extends merged under it."""
    preset_file = Path(presets_dir) / f'{name}.yaml'
    if not preset_file.is_file():
        # a name given in a preset file is fixed there, not on the command line: name that file
        where = f'{_extended_by}: extends: ' if _extended_by else ''
        raise ParamsError(f"{where}no preset '{name}' (known: {', '.join(known_presets(presets_dir)) or 'none'})")
    if name in _seen:
        raise ParamsError(f'presets extend each other in a loop: {" -> ".join((*_seen, name))}')
    override = read_yaml(preset_file)
    base = override.pop('extends', None)
    if not base:
        return override
    if not isinstance(base, str):
        raise ParamsError(f'{preset_file}: extends: give one preset name, got {base!r}')
    return deep_merge(preset_overrides(base, presets_dir, (*_seen, name), preset_file), override, keep_replace=True)


def preset_params(
    name: str, params_file: str | Path = 'params.yaml', presets_dir: str | Path = PRESETS_DIR
) -> dict[str, Any]:
    """params.yaml with presets/<name>.yaml (and what it extends) merged over it, validated; its
    ``report.preset`` names the preset, so that the report says whose numbers it shows."""
    merged = deep_merge(read_yaml(params_file), preset_overrides(name, presets_dir))
    merged.setdefault('report', {})['preset'] = name
    validate(merged, f'{params_file} + {Path(presets_dir) / name}.yaml')
    return merged
