"""Apply a preset (presets/<name>.yaml) to params.yaml: a deep merge, like `dvc exp run -S`.

    python -m dfmsd.presets smoke            # writes params.yaml
    python -m dfmsd.presets smoke --out p.yaml

Mapping values merge key by key; a mapping that holds `_replace: true` replaces the whole
mapping (e.g. a preset with fewer distillation runs).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

PRESETS_DIR = Path(__file__).resolve().parents[1] / 'presets'


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get('_replace'):
            merged[key] = {k: v for k, v in value.items() if k != '_replace'}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_preset(name: str, params_file: str | Path = 'params.yaml',
                 out: str | Path | None = None, presets_dir: str | Path = PRESETS_DIR) -> Path:
    preset_file = Path(presets_dir) / f'{name}.yaml'
    if not preset_file.is_file():
        known = ', '.join(sorted(p.stem for p in Path(presets_dir).glob('*.yaml')))
        raise SystemExit(f'error: no preset {name!r} (known: {known})')
    params = yaml.safe_load(Path(params_file).read_text())
    merged = deep_merge(params, yaml.safe_load(preset_file.read_text()) or {})
    out = Path(out or params_file)
    out.write_text(f'# params.yaml with presets/{name}.yaml applied\n'
                   + yaml.safe_dump(merged, sort_keys=False, width=100))
    return out


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name')
    parser.add_argument('--params', default='params.yaml')
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    print(f'wrote {apply_preset(args.name, args.params, args.out)}')
