"""Teacher checkpoints from the MMDetection model zoo (COCO preset).

A `zoo:` teacher is downloaded, verified against its sha256 (full hash from params, or
the prefix in the file name from mmdet's model index), and re-exported as a plain
tensor-only checkpoint, so nothing downstream ever unpickles an unverified file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmengine.config import Config

from dfmsd.checkpoint import export_plain_checkpoint


def fetch_teacher(name: str, entry: dict[str, Any], params: dict[str, Any],
                  models_dir: str | Path = 'models') -> Path:
    from dfmsd.download import fetch_zoo_teacher, load_verified_checkpoint
    from dfmsd.zoo import find_model
    zoo = find_model(entry['zoo'])
    cache_dir = Path(entry.get('cache_dir', '~/.cache/dfmsd/zoo')).expanduser()
    path = fetch_zoo_teacher(entry['zoo'], cache_dir, sha256=entry.get('sha256'))
    state = load_verified_checkpoint(path, sha256=entry.get('sha256'),
                                     sha256_prefix=None if entry.get('sha256') else zoo.sha256_prefix)
    out = Path(models_dir) / f'{name}.pth'
    export_plain_checkpoint(state.get('state_dict', state), out,
                            meta={'name': name, 'zoo': zoo.name, 'url': zoo.url})
    Config.fromfile(zoo.config).dump(str(Path(models_dir) / f'{name}.py'))
    print(f'[{name}] {zoo.name}: verified {path.name} -> {out}')
    return out
