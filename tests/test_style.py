"""The code base follows one lint and format configuration (pyproject.toml [tool.ruff])."""

import subprocess
import sys

import pytest
from support import REPO

pytestmark = pytest.mark.fast


@pytest.mark.parametrize('command', [['check', '.'], ['format', '--check', '.']], ids=['lint', 'format'])
def test_ruff(command):
    res = subprocess.run([sys.executable, '-m', 'ruff', *command], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_the_report_layer_does_not_import_torch():
    code = (
        'import sys, dfmsd.report.write, dfmsd.report.figures; '
        "bad = [m for m in ('torch', 'mmengine', 'mmdet') if m in sys.modules]; "
        'assert not bad, bad'
    )
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def module_imports() -> dict[str, set[str]]:
    """Every import (module level or inside a function) of the project's modules, by module."""
    import ast

    found = {}
    for path in [*(REPO / 'dfmsd').rglob('*.py'), *(REPO / 'flows').rglob('*.py'), *(REPO / 'stages').glob('*.py')]:
        parts = path.relative_to(REPO).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        package = '.'.join(parts[:-1])
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    base = '.'.join(
                        package.split('.')[: len(package.split('.')) - node.level + 1] + ([base] if base else [])
                    )
                targets |= {base} | {f'{base}.{a.name}' for a in node.names}
        found[name] = {t for t in targets if t.split('.')[0] in ('dfmsd', 'flows')}
    return found


#: each layer (docs/architecture.md) and what it may import, lowest first; a module belongs to
#: the longest prefix that names it
LAYERS = {
    'dfmsd.core': ('dfmsd.core',),
    'dfmsd.data': ('dfmsd.core', 'dfmsd.data'),
    'dfmsd.engine': ('dfmsd.core', 'dfmsd.data', 'dfmsd.engine'),
    'dfmsd.models': ('dfmsd.core', 'dfmsd.data', 'dfmsd.engine', 'dfmsd.models'),
    'dfmsd.report': ('dfmsd.core', 'dfmsd.report'),
    'dfmsd': ('dfmsd',),  # the commands on top: check, evaluation, explain
    'stages': ('dfmsd',),  # one script per DVC stage; knows nothing of the orchestration
    'flows': ('dfmsd.core', 'flows'),
}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + '.')


def layer_of(module: str) -> str:
    return max((layer for layer in LAYERS if within(module, layer)), key=len)


def test_every_layer_imports_only_the_layers_below_it():
    imports = module_imports()
    assert {layer_of(m) for m in imports} == set(LAYERS)  # every layer exists and is checked
    bad = {
        module: sorted(t for t in targets if t != 'dfmsd' and not any(within(t, ok) for ok in LAYERS[layer_of(module)]))
        for module, targets in imports.items()
    }
    assert not {m: b for m, b in bad.items() if b}
