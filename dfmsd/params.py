"""Read params.yaml with errors that name the missing or unknown key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path('params.yaml')


class ParamsError(KeyError):
    """A params.yaml key is missing or names something that does not exist."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f'{path}: params file not found')
    with path.open() as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ParamsError(f'{path}: expected a mapping at the top level')
    return params


def get(params: dict[str, Any], dotted_key: str) -> Any:
    """`get(p, 'models.student.depth')` with an error naming the first missing part."""
    node: Any = params
    walked = []
    for part in dotted_key.split('.'):
        walked.append(part)
        if not isinstance(node, dict) or part not in node:
            known = ', '.join(sorted(node)) if isinstance(node, dict) else 'none'
            raise ParamsError(f"params.yaml: no key '{'.'.join(walked)}' (known here: {known})")
        node = node[part]
    return node
