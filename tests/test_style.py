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
        'import sys, dfmsd.report.tables, dfmsd.report.figures, dfmsd.report.stats; '
        "bad = [m for m in ('torch', 'mmengine', 'mmdet') if m in sys.modules]; "
        'assert not bad, bad'
    )
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def module_imports() -> dict[str, set[str]]:
    """Every import (module level or inside a function) of dfmsd/ and flows/ modules, by module."""
    import ast

    found = {}
    for path in [*(REPO / 'dfmsd').rglob('*.py'), *(REPO / 'flows').rglob('*.py')]:
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


def test_the_package_has_no_import_cycle():
    import networkx as nx

    imports = module_imports()
    graph = nx.DiGraph([(m, t) for m, ts in imports.items() for t in ts if t in imports and t != m])
    # a package's __init__ importing its own submodules is not a cycle of logic
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if b.startswith(a + '.')])
    assert not list(nx.simple_cycles(graph))


def test_layers_only_import_downwards():
    """core imports nothing of the project but core; data: core; report: core; flows: core."""
    allowed = {
        'dfmsd.core': ('dfmsd.core',),
        'dfmsd.data': ('dfmsd.core', 'dfmsd.data'),
        'dfmsd.report': ('dfmsd.core', 'dfmsd.report'),
        'flows': ('dfmsd.core', 'flows'),
    }
    for module, targets in module_imports().items():
        for layer, ok in allowed.items():
            if module == layer or module.startswith(layer + '.'):
                bad = [t for t in targets if t != 'dfmsd' and not t.startswith(ok)]
                assert not bad, f'{module} imports {bad}'
