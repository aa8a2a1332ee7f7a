"""How many arrows each preset's run graph draws: DVC's stage dependencies against the flow's
direct upstream (their transitive reduction, ``flows.stages.Pipeline.direct_upstream``), which
must stay under the 500 edges above which the Prefect UI draws none.

    python benchmarks/graph_size.py [PRESET ...]     # default: params.yaml and every CPU preset

Each is read by DVC from dvc.yaml and the merged params in a scratch project; nothing runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dfmsd.core.presets import preset_params  # noqa: E402
from flows.stages import Pipeline  # noqa: E402


def graph_size(preset: str | None) -> tuple[int, int, int]:
    """(stages, DVC's dependencies, direct arrows) of ``preset`` (None: params.yaml)."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / 'dvc.yaml').write_bytes((REPO / 'dvc.yaml').read_bytes())
        params = preset_params(preset, REPO / 'params.yaml', REPO / 'presets') if preset else None
        (root / 'params.yaml').write_text(
            yaml.safe_dump(params, sort_keys=False) if params else (REPO / 'params.yaml').read_text()
        )
        subprocess.run([sys.executable, '-m', 'dvc', 'init', '--no-scm', '-q'], cwd=root, check=True)
        pipeline = Pipeline.read(root)
        direct = sum(len(up) for up in pipeline.direct_upstream().values())
        return pipeline.graph.number_of_nodes(), pipeline.graph.number_of_edges(), direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('presets', nargs='*', default=['default', 'smoke', 'dfmsd-ablations', 'paper-cpu'])
    args = parser.parse_args()
    print('| preset | stages | DVC dependencies | arrows drawn (direct upstream) |')
    print('|---|---:|---:|---:|')
    for name in args.presets:
        stages, deps, direct = graph_size(None if name == 'default' else name)
        print(f'| {name} | {stages} | {deps} | {direct} |')


if __name__ == '__main__':
    main()
