"""Presets: named overrides of params.yaml (``presets/<name>.yaml``), merged, never written back.

A preset is a partial params file. Mappings merge key by key; a mapping holding
``_replace: true`` replaces the whole mapping (e.g. a preset with other teachers). The merge
result is validated against the schema. ``flows.presets`` runs a preset in its own git
worktree, so that the repository's params.yaml, dvc.lock and results stay as they are.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dfmsd.core.errors import ParamsError
from dfmsd.core.params import read_yaml, validate

PRESETS_DIR = Path('presets')


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get('_replace'):
            merged[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != '_replace'}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def known_presets(presets_dir: str | Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(presets_dir).glob('*.yaml'))


def preset_params(name: str, params_file: str | Path = 'params.yaml',
                  presets_dir: str | Path = PRESETS_DIR) -> dict[str, Any]:
    """params.yaml with presets/<name>.yaml merged over it, validated."""
    preset_file = Path(presets_dir) / f'{name}.yaml'
    if not preset_file.is_file():
        raise ParamsError(f"no preset '{name}' (known: {', '.join(known_presets(presets_dir)) or 'none'})")
    merged = deep_merge(read_yaml(params_file), read_yaml(preset_file))
    validate(merged, f'{params_file} + {preset_file}')
    return merged
