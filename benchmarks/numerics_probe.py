"""Which numeric code paths a training's floats depend on: the weak teacher's first iterations
under each setting, one fresh process per setting (each library reads its setting once).

    python benchmarks/numerics_probe.py [--iters 20] [--rounds 2]

Prints, per setting, the training loss at iteration ``--iters`` (all its digits) and the process
CPU seconds the iterations took (median of ``--rounds`` interleaved rounds). ``native`` is what
the libraries choose on this CPU; ``pinned`` is what every stage runs with (dfmsd.core.numerics);
the others pin one library at a time. The pipeline's own log of the same run is
logs/teachers/<pair>/weak.csv: its first row is the loss at iteration 20 of the committed run, so
``pinned`` here must print exactly that number on a machine that reproduces the committed results.
Needs the dataset (`dvc repro data`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfmsd.core.numerics import PINNED  # noqa: E402  (after the path set-up above)

#: setting -> the environment it runs with (on top of DFMSD_NUMERICS=native, which clears the pins)
SETTINGS = {
    'native': {},
    'ONEDNN_MAX_CPU_ISA=AVX2': {'ONEDNN_MAX_CPU_ISA': 'AVX2'},
    'MKL_CBWR=AVX2,STRICT': {'MKL_CBWR': 'AVX2,STRICT'},
    'ATEN_CPU_CAPABILITY=avx2': {'ATEN_CPU_CAPABILITY': 'avx2'},
    'pinned (all three)': dict(PINNED),
}


def train_once(iters: int) -> None:
    """The worker: the weak teacher of params.yaml's first pair, ``iters`` iterations, one JSON line."""
    import torch

    import dfmsd.models  # noqa: F401  (registers the project's loop, hooks and trackers)
    from dfmsd.core.numerics import machine
    from dfmsd.core.params import load_params
    from dfmsd.engine.configs import training_config
    from dfmsd.engine.training import collect_scalars, run_training

    params = load_params(ROOT / 'params.yaml')
    pair_name, pair = next(iter(params.pairs.items()))
    cfg = training_config(pair.weak, params.data, params.train, pair.weak.iters, params.train.teacher_seed, 'probe')
    cfg.train_cfg.stop_at = iters  # the same schedule as the pipeline's run, stopped early
    with tempfile.TemporaryDirectory() as work_root:
        start = time.process_time()
        work_dir, _ = run_training(cfg, threads=params.runtime.threads, work_root=Path(work_root))
        seconds = time.process_time() - start
        loss = next(row['loss'] for row in collect_scalars(work_dir) if int(row['iter']) == iters)
    record = {'loss': loss, 'cpu_seconds': seconds, **machine(), 'capability': torch.backends.cpu.get_cpu_capability()}
    print('RESULT ' + json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        train_once(args.iters)
        return
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, settings in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k not in PINNED}
            env.update(DFMSD_NUMERICS='native', PYTHONPATH=str(ROOT), **settings)
            res = subprocess.run(
                [sys.executable, __file__, '--worker', '--iters', str(args.iters)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            line = next((x for x in res.stdout.splitlines() if x.startswith('RESULT ')), None)
            if line is None:
                sys.exit(f'{name}: the worker failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}')
            results[name].append(json.loads(line[len('RESULT ') :]))
    first = next(iter(results.values()))[0]
    print(f'{first["cpu"]}; weak teacher, loss at iteration {args.iters}; {args.rounds} interleaved rounds')
    print(f'{"setting":28s} {"loss":>20s} {"same each round":>16s} {"ATen":>7s} {"CPU s":>7s} {"vs native":>9s}')
    native = statistics.median(r['cpu_seconds'] for r in results['native'])
    for name, runs in results.items():
        seconds = statistics.median(r['cpu_seconds'] for r in runs)
        same = len({r['loss'] for r in runs}) == 1
        print(
            f'{name:28s} {runs[0]["loss"]!r:>20s} {"yes" if same else "NO":>16s} {runs[0]["capability"]:>7s} '
            f'{seconds:7.1f} {seconds / native:9.2f}'
        )


if __name__ == '__main__':
    main()
